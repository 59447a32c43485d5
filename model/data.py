"""Training data with no network: the generated corpus, a BPE trained on it locally, token windows.

`prepare_data` caches the tokenizer and token arrays under `data_dir` (generated, git-ignored)
and rebuilds them only when the configuration changes.

With `DataConfig.text` set (`--data text` on the command lines) the data is real text tokenized
with DeepSeek-V4's tokenizer instead (model/textdata.py): the LM's vocabulary is then cut to the
DeepSeek ids the text uses (`PreparedData.vocab_ids`), while the Engram hashing sees DeepSeek's
compressed ids (`PreparedData.compression`), so its row ids are the ones the full vocabulary gives.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memstore.cli_args import enum_choice
from memstore.errors import InvalidArgumentError
from model._tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from model.compression import CompressedTokenizer
from model.corpus import CorpusConfig, generate_corpus

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2


class DataSource(enum.Enum):
    """What the model trains on."""

    GENERATED = "generated"  # the generated world (model/corpus.py) and a BPE trained on it
    TEXT = "text"  # real text files, DeepSeek-V4's tokenizer (model/textdata.py)


@dataclass(frozen=True)
class TextConfig:
    """Real text: UTF-8 files (a directory means its *.txt files, recursively), DeepSeek's tokenizer.

    Each file is one document (<bos> text <eos>); its last `val_fraction` (whole paragraphs) is
    validation. `max_tokens` keeps about that many tokens in all, the same share of every file
    (its beginning), so a small run still sees every source.
    """

    paths: tuple[Path, ...] = (Path("data/text/en"),)
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.paths:
            raise InvalidArgumentError("TextConfig.paths is empty: give at least one text file or directory")
        if self.max_tokens is not None and self.max_tokens < 1_000:
            raise InvalidArgumentError(f"TextConfig.max_tokens must be >= 1000 (None: all); got {self.max_tokens}")


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared data lives and how it is made: the generated world, or real text when `text` is set
    (then `vocab_size` and `corpus` do not apply, and the prepared files go to `data_dir`/realtext)."""

    data_dir: Path = Path("data")
    vocab_size: int = 4096
    val_fraction: float = 0.05
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    text: TextConfig | None = None

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise InvalidArgumentError(f"DataConfig.val_fraction must be in (0, 1); got {self.val_fraction}")

    @property
    def source(self) -> DataSource:
        """What the config trains on."""
        return DataSource.GENERATED if self.text is None else DataSource.TEXT

    def key(self) -> str:
        """Hash of everything that shapes the generated world's prepared data (not where it is stored)."""
        fields = dataclasses.asdict(self)
        fields.pop("data_dir")
        fields.pop("text")  # None here; real text has its own key (model/textdata.py)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PreparedData:
    """Tokenizer and token streams (bos + document + eos, concatenated) of the LM's token ids.

    `vocab_ids` is the vocabulary cut of real text: LM id i is tokenizer id vocab_ids[i] (pad,
    bos and eos first, at 0, 1, 2); None means the LM ids are the tokenizer's. `encode`, `decode`
    and `compression` work in LM ids either way.
    """

    tokenizer: Tokenizer
    tokenizer_path: Path
    train: np.ndarray
    val: np.ndarray
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    vocab_ids: np.ndarray | None = None  # [vocab_size] int64, LM id -> tokenizer id

    @property
    def vocab_size(self) -> int:
        """The LM's vocabulary: the cut's size, else the tokenizer's."""
        return self.tokenizer.get_vocab_size() if self.vocab_ids is None else len(self.vocab_ids)

    @functools.cached_property
    def _lm_id_of(self) -> np.ndarray:
        """Tokenizer id -> LM id, -1 for the ids the cut left out."""
        assert self.vocab_ids is not None
        inverse = np.full(self.tokenizer.get_vocab_size(with_added_tokens=True), -1, dtype=np.int64)
        inverse[self.vocab_ids] = np.arange(len(self.vocab_ids))
        return inverse

    def to_lm_ids(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Tokenizer ids -> LM ids (int64); an id outside the vocabulary cut is an InvalidArgumentError."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if self.vocab_ids is None:
            return ids
        lm_ids = self._lm_id_of[ids]
        if (lm_ids < 0).any():
            missing = sorted({int(i) for i in ids[lm_ids < 0]})[:5]
            pieces = [self.tokenizer.id_to_token(i) for i in missing]
            raise InvalidArgumentError(
                f"tokens {pieces} (ids {missing}) never occur in the training text, so the LM's cut vocabulary "
                f"has no id for them; use words the text uses"
            )
        return lm_ids

    def encode(self, text: str) -> list[int]:
        """Text -> LM ids (no bos/eos)."""
        return self.to_lm_ids(self.tokenizer.encode(text, add_special_tokens=False).ids).tolist()

    def decode(self, lm_ids: Sequence[int] | np.ndarray) -> str:
        """LM ids -> text."""
        ids = np.asarray(lm_ids, dtype=np.int64)
        token_ids = ids if self.vocab_ids is None else self.vocab_ids[ids]
        return self.tokenizer.decode(token_ids.tolist())

    @functools.cached_property
    def compression(self) -> CompressedTokenizer:
        """Engram's compression of the LM's ids: through the cut, onto the full tokenizer's compressed ids."""
        full = CompressedTokenizer(self.tokenizer)
        return full if self.vocab_ids is None else full.restricted(self.vocab_ids)


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
    """Load the cached data for this config, or generate (or read), tokenize and cache it."""
    if config.text is not None:
        from model.textdata import prepare_text  # it builds on this module's PreparedData and _save

        return prepare_text(Path(config.data_dir) / "realtext", config.text, config.val_fraction)
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


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --data {generated,text}, --text PATH..., --text-tokens N (parsed by data_config_from_args)."""
    parser.add_argument("--data-dir", type=Path, default=DataConfig().data_dir, help="prepared data (a cache)")
    parser.add_argument(
        "--data",
        **enum_choice(DataSource),
        default=DataSource.GENERATED,
        help="generated: the generated world and its own BPE; text: real text with DeepSeek-V4's tokenizer "
        "(the `model` extra; get text with scripts/get_text.sh)",
    )
    parser.add_argument(
        "--text",
        type=Path,
        nargs="+",
        help=f"with --data text: text files or directories of *.txt (default {TextConfig().paths[0]})",
    )
    parser.add_argument("--text-tokens", type=int, help="with --data text: use about this many tokens (default: all)")


def data_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DataConfig:
    """The DataConfig of add_data_arguments' flags; contradictions and bad values are usage errors."""
    if args.data is DataSource.GENERATED:
        if args.text is not None or args.text_tokens is not None:
            parser.error("--text and --text-tokens need --data text")
        return DataConfig(data_dir=args.data_dir)
    try:
        text = TextConfig(paths=tuple(args.text or TextConfig().paths), max_tokens=args.text_tokens)
    except InvalidArgumentError as exc:
        parser.error(str(exc).replace("TextConfig.max_tokens", "--text-tokens"))
    for path in text.paths:
        if not path.exists():
            parser.error(f"--text {path} does not exist (scripts/get_text.sh writes data/text/en and data/text/zh)")
    return DataConfig(data_dir=args.data_dir, text=text)
