"""Plain text from documentation sources: HTML and reStructuredText in, UTF-8 prose out.

Real N-gram traffic needs real text. Debian ships some as documentation packages (the kernel's
.rst files, Python's .rst sources, the Debian Administrator's Handbook as HTML in many languages);
scripts/get_text.sh downloads and unpacks them and calls `python -m model.realtext debian` to write
one text file per source and language:

    <out>/en/linux-doc.txt        the kernel documentation (linux-doc-6.1, Documentation/**/*.rst)
    <out>/en/python-doc.txt       Python's documentation (python3.11-doc, html/_sources/**/*.rst.txt)
    <out>/en/debian-handbook.txt  the Debian Administrator's Handbook, en-US HTML
    <out>/zh/debian-handbook.txt  the same book, zh-CN HTML
    <out>/zh/linux-doc.txt        the kernel documentation's zh_CN translations

The converters are plain functions (`html_to_text`, `rst_to_text`) and `python -m model.realtext
convert` runs them on your own files. Only the standard library is used: html.parser for HTML
(script, style, navigation and tables of contents dropped; one paragraph per block element;
whitespace folded except inside <pre>) and a line-based pass for reStructuredText (comments,
section adornments, table borders and non-prose directives dropped; roles and markup reduced to
their text; indentation kept). Documents are separated by a blank line.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from enum import Enum
from html.parser import HTMLParser
from pathlib import Path


class TextFormat(Enum):
    """What a source file holds."""

    HTML = "html"
    RST = "rst"
    TEXT = "text"


# ---------------------------------------------------------------------------------------------- HTML

_SKIP_TAGS = frozenset({"script", "style", "nav", "head", "noscript", "template", "svg", "button", "form", "select"})
# Navigation and boilerplate that Sphinx (Python, the kernel) and Publican (the handbook) put in divs.
_SKIP_CLASSES = frozenset(
    {"toc", "docnav", "navheader", "navfooter", "sphinxsidebar", "related", "footer", "header", "headerlink",
     "breadcrumb", "breadcrumbs", "sidebar-toc", "skip-link", "mobile-nav", "inline-search"}
)  # fmt: skip
_SKIP_IDS = frozenset({"banner", "title", "navigation", "footer", "header", "sidebar", "searchbox"})
_BLOCK_TAGS = frozenset(
    {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "pre", "tr", "table", "blockquote",
     "section", "article", "main", "ul", "ol", "dl", "br", "hr", "title", "figcaption", "caption", "body",
     "aside", "address", "details", "summary", "fieldset", "legend", "figure"}
)  # fmt: skip
_CELL_TAGS = frozenset({"td", "th"})
_VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)
_SPACES = re.compile(r"\s+")


class _HtmlText(HTMLParser):
    """Collects paragraphs of visible text; `skip_depth` > 0 inside a dropped element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buffer: list[str] = []
        self._skip: list[str] = []  # tags of the open elements being dropped (the outermost first)
        self._pre = 0

    def _skipped(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in _SKIP_TAGS:
            return True
        values = dict(attrs)
        if values.get("role") == "navigation" or values.get("id") in _SKIP_IDS:
            return True
        return bool(_SKIP_CLASSES.intersection((values.get("class") or "").split()))

    def _flush(self) -> None:
        text = "".join(self._buffer)
        self._buffer.clear()
        if self._pre:
            text = text.strip("\n")
            if text.strip():
                self.paragraphs.append(text.rstrip())
        else:
            text = _SPACES.sub(" ", text).strip()
            if text:
                self.paragraphs.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip:
            if tag not in _VOID_TAGS:
                self._skip.append(tag)
            return
        if tag not in _VOID_TAGS and self._skipped(tag, attrs):
            self._skip.append(tag)
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        elif tag in _CELL_TAGS:
            self._buffer.append(" ")
        if tag == "pre":
            self._pre += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self._skip and tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            # Close up to the matching open tag: tolerates unclosed children (<p> without </p>).
            if tag in self._skip:
                while self._skip.pop() != tag:
                    pass
            return
        if tag in _BLOCK_TAGS:
            self._flush()
            if tag == "pre" and self._pre:
                self._pre -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_to_text(html: str) -> str:
    """The visible prose of an HTML page: one paragraph per block element, separated by blank lines."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return "\n\n".join(parser.paragraphs)


# ----------------------------------------------------------------------------------- reStructuredText

# Directives whose body is not prose (file lists, generated API docs, images, raw markup).
_DROP_DIRECTIVES = frozenset(
    {"toctree", "kernel-doc", "include", "literalinclude", "image", "figure", "raw", "highlight", "contents",
     "index", "sectionauthor", "moduleauthor", "tabularcolumns", "only", "kernel-feat", "kernel-abi",
     "kernel-include", "cssclass", "csv-table", "flat-table", "list-table", "toctree-hidden", "c:namespace",
     "c:namespace-push", "c:namespace-pop", "default-domain", "currentmodule", "testsetup", "testcleanup",
     "doctest-hidden", "audit-event-table", "availability", "impl-detail-hidden", "miscnews", "opcode-table"}
)  # fmt: skip
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.+-]+)::\s*(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")  # ".. anything" that is not a directive: a comment or a label
_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")
_TABLE_RULE = re.compile(r"^\s*(\+[-=+]+\+|=+(\s+=+)+)\s*$")
_OPTION = re.compile(r"^\s*:[\w-]+:")
_ROLE = re.compile(r":[\w:+.-]+:`([^`<]*?)\s*(?:<[^`>]*>)?`")  # :role:`text <target>` -> text
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`__?")  # `text <url>`_ -> text
_LITERAL = re.compile(r"``(.+?)``")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])")
_SUBSTITUTION = re.compile(r"\|(\w[\w -]*)\|")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _inline(line: str) -> str:
    line = _ROLE.sub(r"\1", line)
    line = _LITERAL.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    line = _STRONG.sub(r"\1", line)
    line = _EMPHASIS.sub(r"\1", line)
    line = _SUBSTITUTION.sub(r"\1", line)
    if line.endswith("::"):  # "as follows::" introduces a literal block; the text reads "as follows:"
        line = line[:-1]
    return line.rstrip()


def rst_to_text(rst: str) -> str:
    """The prose of a reStructuredText document (comments, adornments and non-prose directives dropped)."""
    out: list[str] = []
    lines = rst.expandtabs(8).splitlines()
    drop_above: int | None = None  # dropping the indented body of a block that starts at this indent
    options_of: int | None = None  # just after a directive at this indent: its ":option:" lines go
    for line in lines:
        if not line.strip():
            options_of = None
            if drop_above is None:
                out.append("")
            continue
        indent = _indent(line)
        if drop_above is not None:
            if indent > drop_above:
                continue
            drop_above = None
        if options_of is not None:
            if indent > options_of and _OPTION.match(line):
                continue
            options_of = None
        directive = _DIRECTIVE.match(line)
        if directive:
            name, argument = directive.group(2), directive.group(3)
            if name.lower() in _DROP_DIRECTIVES:
                drop_above = indent
                continue
            options_of = indent
            if argument and name not in {"code-block", "code", "sourcecode", "highlight"}:
                out.append(" " * indent + _inline(argument))
            continue
        if _COMMENT.match(line):  # comments, labels (.. _name:), footnote and link targets
            drop_above = indent
            continue
        if _ADORNMENT.match(line) or _TABLE_RULE.match(line) or line.strip() == "::":
            continue
        out.append(_inline(line))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ------------------------------------------------------------------------------------------ files


def read_source(path: Path) -> bytes:
    """The bytes of a file, gunzipped when its name ends in .gz (Debian compresses documentation)."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def format_of(path: Path) -> TextFormat:
    """A file's format from its name: .html/.htm/.xhtml, .rst (also .rst.txt, .rst.gz), or plain text."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".html", ".htm", ".xhtml")):
        return TextFormat.HTML
    if name.endswith((".rst", ".rst.txt")):
        return TextFormat.RST
    return TextFormat.TEXT


def file_to_text(path: Path, fmt: TextFormat | None = None) -> str:
    """One file's plain text (UTF-8 decoded, undecodable bytes replaced); `fmt` from the name if None."""
    raw = read_source(path).decode("utf-8", errors="replace")
    fmt = format_of(path) if fmt is None else fmt
    if fmt is TextFormat.HTML:
        return html_to_text(raw)
    if fmt is TextFormat.RST:
        return rst_to_text(raw)
    return raw.strip()


def _write_atomic(path: Path, chunks: list[str]) -> int:
    """Write the documents to `path` (temp file, fsync, rename); returns the characters written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            size = 0
            for chunk in chunks:
                out.write(chunk)
                out.write("\n\n")
                size += len(chunk) + 2
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the text is for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


def convert_files(paths: list[Path], out: Path, fmt: TextFormat | None = None) -> tuple[int, int]:
    """Convert files (sorted, for a reproducible order) into one text file; returns (documents, chars)."""
    texts = [text for text in (file_to_text(path, fmt) for path in sorted(paths)) if text]
    return len(texts), _write_atomic(out, texts)


# ------------------------------------------------------------------------------- Debian's packages


@dataclass(frozen=True)
class Source:
    """A set of files inside the unpacked Debian packages, written as `<out>/<language>/<name>.txt`."""

    name: str
    language: str
    root: str  # relative to the unpacked packages' root
    patterns: tuple[str, ...]
    exclude: tuple[str, ...] = ()  # path prefixes relative to `root`


DEBIAN_SOURCES = (
    Source("linux-doc", "en", "usr/share/doc/linux-doc-6.1/Documentation", ("**/*.rst", "**/*.rst.gz"),
           exclude=("translations/",)),
    Source("python-doc", "en", "usr/share/doc/python3.11/html/_sources", ("**/*.rst.txt", "**/*.rst.txt.gz")),
    Source("debian-handbook", "en", "usr/share/doc/debian-handbook/html/en-US", ("*.html", "*.html.gz")),
    Source("debian-handbook", "zh", "usr/share/doc/debian-handbook/html/zh-CN", ("*.html", "*.html.gz")),
    Source("linux-doc", "zh", "usr/share/doc/linux-doc-6.1/Documentation/translations/zh_CN",
           ("**/*.rst", "**/*.rst.gz")),
)  # fmt: skip


def source_files(unpacked: Path, source: Source) -> list[Path]:
    """The files of one source under the unpacked packages' root."""
    base = unpacked / source.root
    if not base.is_dir():
        raise FileNotFoundError(f"{base} is not a directory: unpack the Debian packages first (scripts/get_text.sh)")
    files = {path for pattern in source.patterns for path in base.glob(pattern) if path.is_file()}
    return sorted(p for p in files if not str(p.relative_to(base)).startswith(source.exclude))


def build_debian_text(unpacked: Path, out: Path) -> list[tuple[Source, int, int]]:
    """Write every source of DEBIAN_SOURCES under `out`; returns (source, documents, characters)."""
    report = []
    for source in DEBIAN_SOURCES:
        files = source_files(unpacked, source)
        documents, chars = convert_files(files, out / source.language / f"{source.name}.txt")
        report.append((source, documents, chars))
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m model.realtext debian|convert ...` (see --help)."""
    parser = argparse.ArgumentParser(prog="python -m model.realtext", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    debian = commands.add_parser("debian", help="text of the unpacked Debian documentation packages")
    debian.add_argument("--unpacked", type=Path, required=True, help="where the .deb files were unpacked (dpkg -x)")
    debian.add_argument("--out", type=Path, required=True, help="output directory (en/ and zh/ are made in it)")
    convert = commands.add_parser("convert", help="text of your own HTML / reStructuredText / text files")
    convert.add_argument("paths", type=Path, nargs="+", help="files, or directories searched recursively")
    convert.add_argument("--out", type=Path, required=True, help="the text file to write")
    convert.add_argument(
        "--format", choices=[f.value for f in TextFormat], help="force a format (default: from each file's name)"
    )
    args = parser.parse_args(argv)
    if args.command == "debian":
        for source, documents, chars in build_debian_text(args.unpacked, args.out):
            print(f"{source.language}/{source.name}.txt: {documents} documents, {chars:,} characters")
        return 0
    files: list[Path] = []
    for path in args.paths:
        if path.is_dir():
            files.extend(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            parser.error(f"{path} does not exist")
    fmt = TextFormat(args.format) if args.format else None
    documents, chars = convert_files(files, args.out, fmt)
    print(f"{args.out}: {documents} documents, {chars:,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
