"""Small tables and client settings shared by the test modules."""

from __future__ import annotations

from pathlib import Path

from client import ClientConfig
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.layout import EngramLayout
from memstore.manifest import Manifest
from memstore.optim import OptimizerConfig
from model.corpus import CorpusConfig
from model.engram import EngramConfig
from model.lm import LMConfig

SMALL_LAYOUT = EngramLayout(layer_ids=(1, 4), vocab_size_per_ngram=(500, 700), max_ngram=3, heads_per_ngram=4, dim=16)

# The float storage types (quantized ones are raw bytes below the table: tested through tables).
FLOAT_DTYPES = [dtype for dtype in DType if not dtype.quantized and not dtype.opaque]
# The types a table can be created in (opaque byte rows are only imported).
CREATABLE_DTYPES = [dtype for dtype in DType if not dtype.opaque]

# Fail fast: short deadline, one retry.
FAST_FAIL = ClientConfig(timeout_s=5.0, max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1)


def make_table(
    path: Path,
    dtype: DType = DType.FLOAT16,
    layout: EngramLayout = SMALL_LAYOUT,
    seed: int = 0,
    optimizer: OptimizerConfig | None = None,
) -> Path:
    """Create a small table at `path` (trainable with `optimizer`) and return the path."""
    return create_table(path, Manifest(layout=layout, dtype=dtype, seed=seed, optimizer=optimizer))


# A tiny Engram LM setting (one Engram layer) and corpus for model tests.
SMALL_ENGRAM = EngramConfig(layer_ids=(1,), vocab_size_per_ngram=(500, 500), heads_per_ngram=2, n_embed_per_ngram=16)
SMALL_CORPUS = CorpusConfig(num_people=30, num_cities=8, num_rivers=4, num_orgs=6, num_documents=400)


def small_lm_config(vocab_size: int) -> LMConfig:
    """A two-block LM with one Engram layer (SMALL_ENGRAM): trains in a second."""
    return LMConfig(
        vocab_size=vocab_size, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, engram=SMALL_ENGRAM
    )
