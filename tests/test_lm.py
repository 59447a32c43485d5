"""The small Engram LM: causality, local and memstore tables agree, training lowers the loss."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from client import MemstoreClient
from memstore.create import create_table
from memstore.dtypes import DType
from memstore.manifest import Manifest
from memstore.table import Table
from model.data import PreparedData
from model.lm import LMConfig
from model.train import TableSource, TrainConfig, build_model, load_checkpoint, save_checkpoint, train
from tests.helpers import SMALL_ENGRAM, small_lm_config

ENGRAM = SMALL_ENGRAM


@pytest.fixture
def data(lm_data: PreparedData) -> PreparedData:
    return lm_data


@pytest.fixture
def config(data) -> LMConfig:
    return small_lm_config(data.vocab_size)


def test_logits_at_t_ignore_later_tokens(data, config) -> None:
    torch.manual_seed(0)
    model = build_model(config, data, TableSource.LOCAL)
    for block in model.blocks:  # make the short convolution act, so its causality is tested too
        if block.engram is not None:
            torch.nn.init.normal_(block.engram.short_conv.conv.weight, std=0.1)
    tokens = torch.from_numpy(data.train[:20].astype(np.int64))[None]  # [1, 20]
    changed = tokens.clone()
    changed[0, 12:] = torch.from_numpy(data.train[100:108].astype(np.int64))
    base, after = model(tokens)[0], model(changed)[0]
    # Exactly: logits before position 12 are the same float32 operations on the same values in both
    # calls (masked attention weights are exact zeros), so any difference, however small, is a leak.
    torch.testing.assert_close(after[:, :12], base[:, :12], rtol=0, atol=0)
    assert not torch.allclose(after[:, 12:], base[:, 12:])


def test_memstore_tables_give_the_local_model_outputs(data, config, tmp_path, daemon_factory) -> None:
    torch.manual_seed(0)
    local = build_model(config, data, TableSource.LOCAL)
    path = create_table(tmp_path / "t", Manifest(layout=ENGRAM.layout(), dtype=DType.FLOAT32, seed=ENGRAM.seed))
    with Table.open(path) as table, MemstoreClient(daemon_factory(table).address) as client:
        remote = build_model(config, data, TableSource.MEMSTORE, client)
        remote.load_state_dict(local.state_dict(), strict=False)
        tokens = torch.from_numpy(data.val[:64].astype(np.int64)).view(2, 32)
        torch.testing.assert_close(remote(tokens)[0], local(tokens)[0], rtol=0, atol=0)


@pytest.mark.parametrize("source", [TableSource.LOCAL, TableSource.NONE])
def test_a_short_run_lowers_the_loss_and_checkpoints_round_trip(data, config, tmp_path, source) -> None:
    torch.manual_seed(0)
    model = build_model(config, data, source)
    result = train(model, data, TrainConfig(steps=40, batch_size=8, eval_every=20, eval_batches=2), progress=False)
    assert np.mean(result.train_loss[-5:]) < result.train_loss[0] - 1.0
    assert result.val_loss[-1] < result.val_loss[0]
    save_checkpoint(model, source, tmp_path / "ckpt.pt", result)
    loaded, loaded_source = load_checkpoint(tmp_path / "ckpt.pt", data)
    tokens = torch.from_numpy(data.val[:32].astype(np.int64))[None]
    assert loaded_source is source
    # The same weights and the same computation: the same bits (a tolerance would pass a lossy save).
    torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], rtol=0, atol=0)


def test_generation_extends_the_prompt(data, config) -> None:
    model = build_model(replace(config, engram=ENGRAM), data, TableSource.LOCAL)
    out = model.generate(torch.tensor([[data.bos_id, 5, 6]]), max_new_tokens=10)
    assert out.shape == (1, 13) and out[0, :3].tolist() == [data.bos_id, 5, 6]


def test_train_and_generate_command_lines(tmp_path, capsys) -> None:
    from model import generate as generate_cli
    from model import train as train_cli

    data_dir = str(tmp_path / "data")
    train_cli.main(
        [
            "--source",
            "local",
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--out",
            str(tmp_path / "run"),
            "--data-dir",
            data_dir,
        ]
    )
    assert "2 steps" in capsys.readouterr().out
    generate_cli.main(
        [
            "--checkpoint",
            str(tmp_path / "run" / "ckpt.pt"),
            "--prompt",
            "The river",
            "--max-new-tokens",
            "5",
            "--data-dir",
            data_dir,
        ]
    )
    assert capsys.readouterr().out.startswith("[local] The river")
    with pytest.raises(SystemExit):
        train_cli.main(["--source", "memstore", "--data-dir", data_dir])


def test_an_lm_hashes_with_explicit_head_sizes(data, config, tmp_path) -> None:
    from model.config import lm_config_from_dict, lm_config_to_dict

    sizes = (((1009, 1013), (997, 991)),)  # [layer][order][head], as a table made elsewhere would list them
    explicit = replace(config, engram=replace(ENGRAM, head_sizes=sizes))
    model = build_model(explicit, data, TableSource.LOCAL)
    ids = model.row_ids(torch.from_numpy(data.val[:64].astype(np.int64)).view(2, 32))[1]  # [B, T, heads]
    assert model.hashing.primes(1) == [[1009, 1013], [997, 991]]
    assert int(ids.max()) < 1009 + 1013 + 997 + 991 == explicit.engram.layout().num_rows(1)
    assert lm_config_from_dict(json.loads(json.dumps(lm_config_to_dict(explicit)))) == explicit
