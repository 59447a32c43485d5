"""The one import of the optional `tokenizers` package, with an error that says how to install it.

`tokenizers` belongs to the `model` extra: the daemon and the client run without it. Modules of
model/ that need it import the names from here, so a missing package reads as one clear line.
"""

from __future__ import annotations

INSTALL_HINT = "pip install 'engram-memstore[model]'"

try:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
except ImportError as exc:  # ModuleNotFoundError, or a broken install
    raise ModuleNotFoundError(
        f"the Engram model's tokenizer code needs the optional `tokenizers` package, which is not "
        f"installed ({exc}); install the model extra: {INSTALL_HINT}",
        name="tokenizers",
    ) from None  # the message carries the original error

__all__ = ["INSTALL_HINT", "Regex", "Tokenizer", "decoders", "models", "normalizers", "pre_tokenizers", "trainers"]
