"""Training data with no network: the generated corpus, a BPE trained on it locally, token windows.

`prepare_data` caches the tokenizer and token arrays under `data_dir` (generated, git-ignored)
and rebuilds them only when the configuration changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model._tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from model.corpus import CorpusConfig, generate_corpus

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared data lives and how it is made."""

    data_dir: Path = Path("data")
    vocab_size: int = 4096
    val_fraction: float = 0.05
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    def key(self) -> str:
        """Hash of everything that shapes the prepared data (not where it is stored)."""
        fields = dataclasses.asdict(self)
        fields.pop("data_dir")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PreparedData:
    """Tokenizer and token streams (bos + document + eos, concatenated)."""

    tokenizer: Tokenizer
    tokenizer_path: Path
    train: np.ndarray
    val: np.ndarray
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def _train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def _encode(tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
    bos, eos = tokenizer.token_to_id("<bos>"), tokenizer.token_to_id("<eos>")
    pieces = [np.array([bos, *encoding.ids, eos], dtype=np.uint16) for encoding in tokenizer.encode_batch(documents)]
    return np.concatenate(pieces)


def _save(path: Path, write) -> None:
    """Write through `write(tmp)`, make it durable, then rename over `path`: a crash leaves the old
    file or the whole new one (meta.json, written last, never marks files that are not on disk)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


def _save_array(path: Path, values: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # closed (flushed) before the fsync and the rename
            np.save(f, values)

    _save(path, write)


def prepare_data(config: DataConfig = DataConfig()) -> PreparedData:
    """Load the cached data for this config, or generate, tokenize and cache it."""
    directory = Path(config.data_dir)
    meta_path, tokenizer_path = directory / "meta.json", directory / "tokenizer.json"
    train_path, val_path = directory / "train.npy", directory / "val.npy"
    fresh = meta_path.exists() and json.loads(meta_path.read_text()).get("key") == config.key()
    if not fresh:
        directory.mkdir(parents=True, exist_ok=True)
        documents = generate_corpus(config.corpus)
        num_val = max(1, int(len(documents) * config.val_fraction))
        tokenizer = _train_tokenizer(documents[num_val:], config.vocab_size)
        _save(tokenizer_path, lambda p: tokenizer.save(str(p)))
        _save_array(train_path, _encode(tokenizer, documents[num_val:]))
        _save_array(val_path, _encode(tokenizer, documents[:num_val]))
        _save(meta_path, lambda p: p.write_text(json.dumps({"key": config.key()})))
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    return PreparedData(tokenizer, tokenizer_path, np.load(train_path), np.load(val_path))


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (inputs [B, T], targets [B, T]) windows at random offsets, deterministic from seed."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
        window = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)  # [B, T+1]
        yield window[:, :-1], window[:, 1:]


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows from the start of `tokens`, at most max_batches batches."""
    num_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    windows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(num_windows)]).astype(np.int64)
    return [(w[:, :-1], w[:, 1:]) for w in np.array_split(windows, -(-num_windows // batch_size))]
