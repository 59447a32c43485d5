"""Plain text from HTML and reStructuredText (model/realtext.py), on small documents the tests write."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from model.realtext import (
    DEBIAN_SOURCES,
    TextFormat,
    build_debian_text,
    convert_files,
    file_to_text,
    format_of,
    html_to_text,
    main,
    rst_to_text,
)

PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<html><head><title>Page title</title><style>p { color: red }</style><script>var x = "<p>no</p>";</script></head>
<body><div id="banner"><a href="x">Download the ebook</a></div>
<ul class="docnav top"><li class="previous"><a href="a.html"><strong>Prev</strong></a></li></ul>
<nav>Site menu</nav>
<div class="toc"><dl><dt>6.1. Contents entry</dt></dl></div>
<h1 class="title">Chapter 6. APT</h1>
<div class="para">APT is   the <code class="filename">sources.list</code>
reader &amp; more.<br/>Second line.</div>
<p>Caf&eacute; <em>naïve</em></p><img src="a.png" alt="pic">
<pre class="programlisting">deb http://deb.debian.org/debian  bookworm main
    indented line
</pre>
<table><tr><td>cell one</td><td>cell two</td></tr></table>
<div class="sphinxsidebar"><p>Quick search</p></div>
<p>第 12 章 高级管理</p>
</body></html>"""


def test_html_keeps_prose_and_drops_boilerplate() -> None:
    text = html_to_text(PAGE)
    assert text.split("\n\n") == [
        "Chapter 6. APT",
        "APT is the sources.list reader & more.",
        "Second line.",
        "Café naïve",
        "deb http://deb.debian.org/debian  bookworm main\n    indented line",  # <pre> keeps its spacing
        "cell one cell two",
        "第 12 章 高级管理",
    ]


def test_html_tolerates_unclosed_elements_inside_a_dropped_one() -> None:
    assert html_to_text("<nav><p>menu<p>more</nav><p>body</p>") == "body"
    assert html_to_text("<div class='related'><ul><li>a<li>b</ul></div>text") == "text"


RST = """.. SPDX-License-Identifier: GPL-2.0

.. _pci:

==============================
How To Write Linux PCI Drivers
==============================

:Authors: Martin Mares

The world of PCI is **vast**, see :c:func:`pci_register_driver` and
:ref:`the howto <pci-howto>` or `LWN <https://lwn.net/>`_; use ``lspci``::

    $ lspci -v

.. toctree::
   :maxdepth: 2

   pci
   msi-howto

.. note::
   :class: small

   Keep *this* note.

.. function:: open(file, mode='r')

   Open a file.

+------+------+
| a    | b    |
+------+------+

Structure
---------
A |version| paragraph.
"""


def test_rst_keeps_prose_and_drops_markup() -> None:
    assert rst_to_text(RST).split("\n\n") == [
        "How To Write Linux PCI Drivers",
        ":Authors: Martin Mares",
        "The world of PCI is vast, see pci_register_driver and\nthe howto or LWN; use lspci:",
        "    $ lspci -v",
        "   Keep this note.",
        "open(file, mode='r')",
        "   Open a file.",
        "| a    | b    |",
        "Structure\nA version paragraph.",
    ]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.html", TextFormat.HTML),
        ("a.HTM", TextFormat.HTML),
        ("a.html.gz", TextFormat.HTML),
        ("a.rst", TextFormat.RST),
        ("a.rst.gz", TextFormat.RST),
        ("a.rst.txt", TextFormat.RST),
        ("a.txt", TextFormat.TEXT),
        ("README", TextFormat.TEXT),
    ],
)
def test_format_from_the_name(name: str, fmt: TextFormat) -> None:
    assert format_of(Path(name)) is fmt


def test_files_gzipped_or_not_into_one_text(tmp_path: Path) -> None:
    (tmp_path / "b.rst.gz").write_bytes(gzip.compress("Title\n=====\n\nSecond *doc*.\n".encode()))
    (tmp_path / "a.html").write_text("<p>First doc.</p>", encoding="utf-8")
    (tmp_path / "c.txt").write_bytes(b"bad byte \xff here\n")
    (tmp_path / "empty.html").write_text("<script>x</script>", encoding="utf-8")
    out = tmp_path / "out" / "all.txt"
    documents, chars = convert_files(sorted(tmp_path.glob("*.*")), out)
    text = out.read_text(encoding="utf-8")
    assert documents == 3  # the empty page adds nothing
    assert text == "First doc.\n\nTitle\n\nSecond doc.\n\nbad byte \ufffd here\n\n"
    assert chars == len(text)
    assert file_to_text(tmp_path / "a.html", TextFormat.TEXT) == "<p>First doc.</p>"


def _fake_debian_tree(root: Path) -> None:
    """Two files for each source, under the paths the packages use (and one translation to skip)."""
    for source in DEBIAN_SOURCES:
        base = root / source.root
        base.mkdir(parents=True, exist_ok=True)
        if source.patterns[0].endswith(".html"):
            for i in range(2):
                (base / f"p{i}.html").write_text(f"<p>{source.language} page {i}</p>", encoding="utf-8")
        else:
            suffix = ".rst.txt" if "rst.txt" in source.patterns[0] else ".rst.gz"
            sub = base / "sub"
            sub.mkdir(exist_ok=True)
            for i in range(2):
                data = f"{source.name} {source.language} doc {i}\n".encode()
                (sub / f"d{i}{suffix}").write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    (root / DEBIAN_SOURCES[0].root / "translations" / "it_IT").mkdir(parents=True)
    (root / DEBIAN_SOURCES[0].root / "translations" / "it_IT" / "x.rst").write_text("italiano", encoding="utf-8")


def test_debian_layout(tmp_path: Path) -> None:
    _fake_debian_tree(tmp_path / "unpacked")
    report = build_debian_text(tmp_path / "unpacked", tmp_path / "text")
    assert [(s.language, s.name, docs) for s, docs, _ in report] == [
        ("en", "linux-doc", 2),  # translations/ excluded
        ("en", "python-doc", 2),
        ("en", "debian-handbook", 2),
        ("zh", "debian-handbook", 2),
        ("zh", "linux-doc", 2),
    ]
    assert (tmp_path / "text/en/linux-doc.txt").read_text() == "linux-doc en doc 0\n\nlinux-doc en doc 1\n\n"
    assert (tmp_path / "text/zh/debian-handbook.txt").read_text() == "zh page 0\n\nzh page 1\n\n"
    assert "italiano" not in (tmp_path / "text/en/linux-doc.txt").read_text()


def test_debian_layout_missing_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="get_text.sh"):
        build_debian_text(tmp_path, tmp_path / "text")


def test_command_line_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.rst").write_text("Hello *world*\n", encoding="utf-8")
    assert main(["convert", str(tmp_path / "in"), "--out", str(tmp_path / "out.txt")]) == 0
    assert (tmp_path / "out.txt").read_text() == "Hello world\n\n"
    assert "1 documents" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o.txt")])
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "in"), "--out", str(tmp_path / "o.txt"), "--format", "pdf"])
