"""Real text as training data: DeepSeek-V4's tokenizer, a vocabulary cut for the LM, cached token arrays.

    python -m model.train --data text --text data/text/en --text-tokens 2000000

Files (`TextConfig.paths`; a directory stands for its *.txt files, recursively, sorted) are read as
UTF-8 and split into paragraphs at blank lines; paragraphs are grouped into chunks of about
`_CHUNK_CHARS` characters and tokenized in parallel with DeepSeek-V4's tokenizer (no special
tokens), so a file's stream is its chunks' tokens back to back. Each file is one document:
<bos> train part | validation part <eos>, the validation part being the file's last
`val_fraction` of kept chunks. With `max_tokens`, each file keeps its first chunks up to its share
of the budget (its share of all tokens).

The vocabulary cut: DeepSeek's 129,280 ids are too many for the output layer of a small LM on a
CPU, and a few million tokens of text use only 20-35 thousand of them. The LM's ids are a dense
remap: LM id 0, 1, 2 are DeepSeek's pad, bos and eos (ids 2, 0, 1), then every other DeepSeek id
the kept text uses, in increasing order (`vocab.npy` holds LM id -> DeepSeek id). The Engram
hashing does not see the cut: `PreparedData.compression` maps LM ids to DeepSeek's compressed ids
(99,092 of them), so the N-gram rows are the ones DeepSeek's full vocabulary gives for the same text.

The arrays are cached in the directory given (`<data_dir>/realtext`) under a key of the files'
contents, the tokenizer file and the settings; they are rebuilt when any of these change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from memstore.errors import InvalidArgumentError
from model.data import PreparedData, TextConfig, _save, _save_array
from model.deepseek import BOS_ID, EOS_ID, PAD_ID, deepseek_tokenizer, deepseek_tokenizer_path

_CHUNK_CHARS = 16_384  # a tokenizer batch item: paragraphs up to about this many characters
_FORMAT = 1  # bump when the preparation below changes what it writes


def text_files(paths: tuple[Path, ...]) -> list[Path]:
    """The files of `paths`: files as given, directories as their *.txt files (recursively, sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise InvalidArgumentError(f"{path} has no .txt files (scripts/get_text.sh writes data/text/en)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InvalidArgumentError(f"{path} does not exist (scripts/get_text.sh writes data/text/en and zh)")
    return files


def _chunks(text: str) -> list[str]:
    """Paragraphs (blank-line separated, separators kept) grouped into chunks of about _CHUNK_CHARS."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if not paragraph.strip():
            continue
        current.append(paragraph + "\n\n")
        size += len(paragraph) + 2
        if size >= _CHUNK_CHARS:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return chunks


def _key(files: list[Path], config: TextConfig, val_fraction: float) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.resolve()).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(hashlib.sha256(deepseek_tokenizer_path().read_bytes()).digest())
    digest.update(json.dumps([config.max_tokens, val_fraction, _CHUNK_CHARS, _FORMAT]).encode())
    return digest.hexdigest()[:16]


def tokenize_text(files: list[Path], max_tokens: int | None, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek token ids (int64) of the train and validation streams, files in order (see the module doc)."""
    tokenizer = deepseek_tokenizer()
    per_file: list[list[list[int]]] = []
    for path in files:
        chunks = _chunks(path.read_text(encoding="utf-8"))
        if not chunks:
            raise InvalidArgumentError(f"{path} holds no text")
        per_file.append([e.ids for e in tokenizer.encode_batch(chunks, add_special_tokens=False)])
    total = sum(len(ids) for chunks in per_file for ids in chunks)
    train, val = [], []
    for chunks in per_file:
        if max_tokens is not None:
            budget = max_tokens * sum(len(ids) for ids in chunks) / total
            kept, size = [], 0
            for ids in chunks:
                if size >= budget:
                    break
                kept.append(ids)
                size += len(ids)
            chunks = kept
        num_val = max(1, round(len(chunks) * val_fraction))
        if len(chunks) < 2:  # too little for both parts: split the one chunk itself
            ids = chunks[0]
            cut = len(ids) - max(1, round(len(ids) * val_fraction))
            chunks, num_val = [ids[:cut], ids[cut:]], 1
        train.append(np.array([BOS_ID, *(i for ids in chunks[:-num_val] for i in ids)], dtype=np.int64))
        val.append(np.array([*(i for ids in chunks[-num_val:] for i in ids), EOS_ID], dtype=np.int64))
    return np.concatenate(train), np.concatenate(val)


def vocabulary_cut(*streams: np.ndarray) -> np.ndarray:
    """LM id -> DeepSeek id: pad, bos, eos, then the other ids the streams use, ascending."""
    specials = np.array([PAD_ID, BOS_ID, EOS_ID], dtype=np.int64)
    used = np.unique(np.concatenate(streams))
    return np.concatenate([specials, np.setdiff1d(used, specials)])


def prepare_text(directory: Path, config: TextConfig, val_fraction: float) -> PreparedData:
    """Load the cached real-text data for these files and settings, or tokenize, cut and cache it."""
    files = text_files(config.paths)
    key = _key(files, config, val_fraction)
    meta_path = directory / "meta.json"
    paths = {name: directory / f"{name}.npy" for name in ("train", "val", "vocab")}
    fresh = meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key
    if not fresh:
        directory.mkdir(parents=True, exist_ok=True)
        train, val = tokenize_text(files, config.max_tokens, val_fraction)
        vocab = vocabulary_cut(train, val)
        lm_id = np.full(int(vocab.max()) + 1, -1, dtype=np.int64)
        lm_id[vocab] = np.arange(len(vocab))
        dtype = np.uint16 if len(vocab) <= 1 << 16 else np.uint32
        _save_array(paths["train"], lm_id[train].astype(dtype))
        _save_array(paths["val"], lm_id[val].astype(dtype))
        _save_array(paths["vocab"], vocab)
        meta = {"key": key, "files": [str(p) for p in files], "train_tokens": len(train), "val_tokens": len(val)}
        _save(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))
    tokenizer = deepseek_tokenizer()
    return PreparedData(
        tokenizer,
        deepseek_tokenizer_path(),
        np.load(paths["train"]),
        np.load(paths["val"]),
        vocab_ids=np.load(paths["vocab"]),
    )
