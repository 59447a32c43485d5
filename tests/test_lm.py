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
from memstore.live import LiveConfig, LiveTable
from memstore.table import Table
from memstore.tabledir.manifest import Manifest
from model.compression import CompressedTokenizer
from model.data import PreparedData
from model.lm import EngramLM, LMConfig
from model.train import TableSource, TrainConfig, build_model, load_checkpoint, save_checkpoint, train
from tests.helpers import SMALL_ENGRAM, small_lm_config

ENGRAM = SMALL_ENGRAM
DIM = SMALL_ENGRAM.layout().dim


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


# --- where the model runs: --device, rows on the model's device, decoding there --------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _no_gpu(monkeypatch) -> None:
    """This process sees no GPU, whatever the machine has (so the CPU-machine behaviour is tested everywhere)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_names_resolve_and_unknown_ones_are_refused(monkeypatch) -> None:
    from memstore.errors import InvalidArgumentError
    from model.device import resolve_device

    _no_gpu(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")  # a CPU-only machine behaves as before
    assert resolve_device("CPU") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda:-1", "mps", ""):
        with pytest.raises(InvalidArgumentError, match="pass auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    for absent in ("cuda", "cuda:0"):
        with pytest.raises(InvalidArgumentError, match="sees no CUDA GPU"):
            resolve_device(absent)


@pytest.mark.parametrize("cli", ["train", "generate"])
def test_device_flag_without_a_gpu_is_a_usage_error_not_a_traceback(tmp_path, capsys, monkeypatch, cli) -> None:
    from model import generate as generate_cli
    from model import train as train_cli

    _no_gpu(monkeypatch)
    main = train_cli.main if cli == "train" else generate_cli.main
    base = ["--data-dir", str(tmp_path / "data")] + ([] if cli == "train" else ["--checkpoint", str(tmp_path / "c")])
    for value, message in (("cuda", "sees no CUDA GPU"), ("tpu", "unknown device 'tpu'")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--device", value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --device" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()  # refused before any work


def test_train_and_generate_run_on_the_auto_device(tmp_path, capsys, monkeypatch) -> None:
    from model import generate as generate_cli
    from model import train as train_cli

    _no_gpu(monkeypatch)
    data_dir = str(tmp_path / "data")
    run = ["--source", "local", "--steps", "2", "--eval-every", "2", "--out", str(tmp_path / "run")]
    train_cli.main([*run, "--data-dir", data_dir, "--device", "auto"])
    assert "2 steps" in capsys.readouterr().out
    checkpoint = str(tmp_path / "run" / "ckpt.pt")
    generate_cli.main(["--checkpoint", checkpoint, "--max-new-tokens", "3", "--data-dir", data_dir, "--device", "cpu"])
    assert capsys.readouterr().out.startswith("[local] The")


@pytest.mark.parametrize(("flag", "value"), [("--steps", "0"), ("--eval-every", "0"), ("--batch-size", "0")])
def test_zero_steps_or_intervals_are_refused_before_the_checkpoint_is_touched(tmp_path, capsys, flag, value) -> None:
    from model import train as train_cli

    (tmp_path / "run").mkdir()
    checkpoint = tmp_path / "run" / "ckpt.pt"
    checkpoint.write_bytes(b"an earlier run's weights")
    argv = ["--source", "local", "--steps", "2", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "d")]
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*argv, flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} must be at least 1; got 0" in capsys.readouterr().err
    assert checkpoint.read_bytes() == b"an earlier run's weights"


def _table_fetcher(tmp_path, dtype: DType = DType.FLOAT32):
    from client import TableFetcher

    path = create_table(tmp_path / "t", Manifest(layout=ENGRAM.layout(), dtype=dtype, seed=ENGRAM.seed))
    return Table.open(path), TableFetcher


@pytest.mark.parametrize("use", ["train", "generate"])
def test_a_prefetcher_delivering_rows_elsewhere_than_the_model_is_refused(data, config, tmp_path, use) -> None:
    """Rows on another device than the model's would be copied by every layer, blocking and unseen by the
    stall figures (what a CUDA model got with the default PrefetchConfig). The meta device stands in
    for the GPU here: the same mismatch, on any machine."""
    from client import PrefetchConfig, Prefetcher
    from memstore.errors import InvalidArgumentError
    from model.generate import sample

    model = build_model(config, data, TableSource.LOCAL)  # on the CPU
    table, fetcher = _table_fetcher(tmp_path)
    with table, Prefetcher(fetcher(table), model.row_ids, ENGRAM.layer_ids, PrefetchConfig(device="meta")) as pre:
        with pytest.raises(InvalidArgumentError, match=r"PrefetchConfig\(device='cpu'\)"):
            if use == "train":
                train(model, data, TrainConfig(steps=2, batch_size=2, eval_every=2), progress=False, prefetcher=pre)
            else:
                sample(model, data, ["The"], 2, 0.8, 0, prefetcher=pre)
        assert pre.stats.steps == 0  # refused before anything was fetched


@pytest.mark.parametrize("dtype", [DType.FLOAT16, DType.FLOAT8_E4M3_ROWSCALE, DType.INT8_ROWSCALE])
def test_memstore_rows_travel_as_stored_and_decode_on_the_tables_device(
    tmp_path, daemon_factory, monkeypatch, dtype
) -> None:
    """The stored bytes (a quarter of float32's for fp8/int8) move to the device and decode there; on
    the CPU the rows are the same bits as decoding the stored rows directly."""
    from client import RemoteEmbedding

    path = create_table(tmp_path / "t", Manifest(layout=ENGRAM.layout(), dtype=dtype, seed=ENGRAM.seed))
    layer = ENGRAM.layer_ids[0]
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, ENGRAM.layout().num_rows(layer), (2, 5, 4)))
    decoded_on: list[tuple[str, int]] = []
    dequantize = DType.dequantize

    def spy(self, rows):
        decoded_on.append((rows.device.type, rows.shape[-1]))
        return dequantize(self, rows)

    with Table.open(path) as table, MemstoreClient(daemon_factory(table).address) as client:
        expected = dtype.to_float32(table.gather(layer, ids.reshape(-1).numpy()))  # [N, dim]
        cpu_rows = RemoteEmbedding(client, layer)(ids)
        assert cpu_rows.device.type == "cpu"
        np.testing.assert_array_equal(cpu_rows.reshape(-1, DIM).numpy(), expected)
        monkeypatch.setattr(DType, "dequantize", spy)
        meta_rows = RemoteEmbedding(client, layer, device="meta")(ids)
    assert meta_rows.device.type == "meta" and meta_rows.shape == (2, 5, 4, DIM)
    assert decoded_on == [("meta", dtype.stored_width(DIM))]


@CUDA
@pytest.mark.parametrize("dtype", [DType.FLOAT32, DType.BFLOAT16, DType.FLOAT8_E4M3_ROWSCALE, DType.INT8_ROWSCALE])
def test_memstore_rows_on_cuda_are_the_cpu_rows_bit_for_bit(tmp_path, daemon_factory, dtype) -> None:
    from client import RemoteEmbedding

    path = create_table(tmp_path / "t", Manifest(layout=ENGRAM.layout(), dtype=dtype, seed=ENGRAM.seed))
    layer = ENGRAM.layer_ids[0]
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, ENGRAM.layout().num_rows(layer), (2, 5, 4)))
    with Table.open(path) as table, MemstoreClient(daemon_factory(table).address) as client:
        cpu_rows = RemoteEmbedding(client, layer)(ids)
        gpu_rows = RemoteEmbedding(client, layer, device="cuda")(ids.cuda())
    assert gpu_rows.device.type == "cuda"
    assert torch.equal(gpu_rows.cpu().view(torch.int32), cpu_rows.view(torch.int32))


@CUDA
def test_a_cuda_model_refuses_the_default_cpu_prefetcher(data, config, tmp_path) -> None:
    from client import Prefetcher
    from memstore.errors import InvalidArgumentError

    model = build_model(config, data, TableSource.LOCAL, device="cuda")
    table, fetcher = _table_fetcher(tmp_path)
    with table, Prefetcher(fetcher(table), model.row_ids, ENGRAM.layer_ids) as prefetcher:
        with pytest.raises(InvalidArgumentError, match="PrefetchConfig"):
            train(model, data, TrainConfig(steps=2, batch_size=2, eval_every=2), progress=False, prefetcher=prefetcher)


@CUDA
@pytest.mark.parametrize("dtype", [DType.FLOAT32, DType.INT8_ROWSCALE])
def test_cuda_generation_is_the_same_with_and_without_the_prefetcher(data, config, tmp_path, dtype) -> None:
    """Same weights, same rows (the table's, decoded on the GPU either way), same seed: the same tokens.
    The forward passes are the same kernels on the same values, and each step draws once from the
    CUDA generator in both, so the tokens must agree exactly."""
    from client import PrefetchConfig, Prefetcher, TableFetcher
    from model.sources import MappedTable

    torch.manual_seed(0)
    path = create_table(tmp_path / "t", Manifest(layout=ENGRAM.layout(), dtype=dtype, seed=ENGRAM.seed))
    prompt = torch.from_numpy(data.val[:24].astype(np.int64)).view(2, 12).cuda()  # [B, T0]
    with Table.open(path) as table:
        tables = {layer: MappedTable(table, layer) for layer in ENGRAM.layer_ids}  # rows read from the table
        model = EngramLM(config, CompressedTokenizer(data.tokenizer), data.pad_id, tables).to("cuda")
        torch.manual_seed(1)
        plain = model.generate(prompt, 20)
        config_cuda = PrefetchConfig(device="cuda")
        with Prefetcher(TableFetcher(table), model.row_ids, ENGRAM.layer_ids, config_cuda) as prefetcher:
            torch.manual_seed(1)
            prefetched = model.generate(prompt, 20, prefetcher=prefetcher)
            assert prefetcher.stats.steps == 20  # the prompt, then each new position but the last
    assert prefetched.device.type == "cuda"
    assert torch.equal(prefetched, plain)


def test_generating_from_a_memstore_checkpoint_without_an_address_is_a_usage_error(tmp_path, capsys) -> None:
    from model import generate as generate_cli
    from model import train as train_cli

    data_dir = str(tmp_path / "data")
    train_cli.main(
        ["--source", "local", "--steps", "1", "--eval-every", "1", "--out", str(tmp_path / "run")]
        + ["--data-dir", data_dir, "--device", "cpu"]
    )
    checkpoint = tmp_path / "run" / "ckpt.pt"
    payload = torch.load(checkpoint, weights_only=True)
    torch.save({**payload, "source": TableSource.MEMSTORE.value}, checkpoint)  # as a memstore run saves it
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(["--checkpoint", str(checkpoint), "--data-dir", data_dir, "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "needs a daemon address (--memstore HOST:PORT)" in err and "Traceback" not in err


# --- the device cache through the command lines and the training report ----------------------------


def _memstore_checkpoint(data, config, path) -> str:
    """A checkpoint whose tables are a memstore's (as a memstore run saves it)."""
    torch.manual_seed(0)
    save_checkpoint(build_model(config, data, TableSource.LOCAL), TableSource.MEMSTORE, path)
    return str(path)


def test_generation_with_the_device_cache_gives_the_same_tokens(data, config, tmp_path, daemon_factory, capsys,
                                                                monkeypatch) -> None:  # fmt: skip
    """model.generate with --cache-rows: same checkpoint, same table, same seed, so the same text, with rows
    served from the cache. The table is trainable (SGD): generating opts in, as nobody trains it here."""
    from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
    from model import generate as generate_cli

    monkeypatch.setattr(generate_cli, "prepare_data", lambda _config: data)  # the fixture's small corpus
    checkpoint = _memstore_checkpoint(data, config, tmp_path / "ckpt.pt")
    manifest = Manifest(
        layout=ENGRAM.layout(), dtype=DType.FLOAT16, seed=ENGRAM.seed, optimizer=OptimizerConfig(OptimizerKind.SGD)
    )
    with LiveTable.open(create_table(tmp_path / "t", manifest), config=LiveConfig()) as live:
        address = daemon_factory(live).address
        with MemstoreClient(address) as client:
            assert client.trainable
        argv = ["--checkpoint", checkpoint, "--memstore", address, "--device", "cpu", "--max-new-tokens", "8"]
        argv += ["--prompt", "The river", "--prompt", "The", "--samples", "2", "--temperature", "1.5"]
        outputs = []
        for cache in ([], ["--cache-rows", "40", "--cache-policy", "lfu"], ["--cache-bytes", "1KiB"]):
            generate_cli.main([*argv, *cache])
            outputs.append(capsys.readouterr().out.splitlines())
    texts = [[line for line in out if line.startswith("[memstore]")] for out in outputs]
    assert len(texts[0]) == 4 and texts[1] == texts[0] and texts[2] == texts[0]
    assert "cache" not in outputs[0][-1]
    for out in outputs[1:]:
        hits, accesses = (int(n.replace(",", "")) for n in out[-1].split("device cache: hit rate ")[1]
                          .split("(")[1].split(" accesses")[0].split("/"))  # fmt: skip
        assert 0 < hits < accesses


def test_training_through_the_device_cache_reports_each_tier_and_trains_alike(data, config, tmp_path) -> None:
    """A frozen table read through the cache gives the rows it gives without it: the same losses. The report
    carries the device tier's counts for the training steps alone (evaluations read without the prefetcher)."""
    from client import CacheConfig, PrefetchConfig, Prefetcher, TableFetcher
    from model.train import report

    train_config = TrainConfig(steps=6, batch_size=4, eval_every=3, eval_batches=2)
    table, _ = _table_fetcher(tmp_path, DType.FLOAT16)
    results = []
    with table:
        for cache in (None, CacheConfig(max_rows=200)):
            torch.manual_seed(0)
            model = build_model(config, data, TableSource.LOCAL)
            prefetch = PrefetchConfig(cache=cache)
            with Prefetcher(TableFetcher(table), model.row_ids, ENGRAM.layer_ids, prefetch) as prefetcher:
                results.append(train(model, data, train_config, progress=False, prefetcher=prefetcher))
                stats = prefetcher.stats.cache
    plain, cached = results
    assert cached.train_loss == plain.train_loss and cached.val_loss == plain.val_loss
    assert plain.cache_tiers == [] and len(cached.cache_tiers) == 1
    tier = cached.cache_tiers[0]
    heads = ENGRAM.heads_per_ngram * (ENGRAM.max_ngram - 1)
    accesses = train_config.steps * train_config.batch_size * config.max_seq_len * heads
    assert tier.tier == "device" and tier.hits + tier.misses == accesses == cached.rows_fetched
    assert 0 < tier.hits < accesses and tier.rows_saved > 0
    assert tier.bytes_fetched == tier.rows_fetched * DType.FLOAT16.row_bytes(DIM)
    assert (tier.hits, tier.rows_fetched) == (stats.hits, stats.rows_fetched)  # nothing but training used it
    text = report(cached, train_config)
    assert f"device cache: hit rate {tier.hit_rate:.1%} ({tier.hits:,} of {accesses:,} row reads)" in text
    assert f"fetched from the tier below {tier.rows_fetched:,} rows" in text and "exposed stall" in text
    assert "device cache" not in report(plain, train_config)


def test_training_a_trainable_table_through_the_cache_from_the_command_line(
    data, config, tmp_path, daemon_factory, capsys, monkeypatch
) -> None:
    """model.train --cache-rows over a trainable table: the cache follows the pushes (within --cache-max-lag
    versions), so it hits while every row read is pushed, and the run trains as it does without the cache."""
    from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
    from model import train as train_cli
    from model.config import lm_config_to_dict

    monkeypatch.setattr(train_cli, "prepare_data", lambda _config: data)
    (tmp_path / "lm.json").write_text(json.dumps(lm_config_to_dict(config)))
    manifest = Manifest(
        layout=ENGRAM.layout(), dtype=DType.FLOAT32, seed=ENGRAM.seed, optimizer=OptimizerConfig(OptimizerKind.SGD)
    )
    losses = []
    for run, cache in (("plain", []), ("cached", ["--cache-rows", "300", "--cache-max-lag", "0"])):
        with LiveTable.open(create_table(tmp_path / run, manifest), config=LiveConfig()) as live:
            argv = ["--source", "memstore", "--memstore", daemon_factory(live).address, "--device", "cpu"]
            argv += ["--lm-config", str(tmp_path / "lm.json"), "--steps", "4", "--batch-size", "4"]
            argv += ["--eval-every", "4", "--out", str(tmp_path / f"run-{run}"), *cache]
            train_cli.main(argv)
            assert live.version == 4 * len(ENGRAM.layer_ids)  # every step pushed
        out = capsys.readouterr().out
        losses.append(out.splitlines()[1])  # train loss first -> last, val loss (3 decimals)
        assert ("device cache: hit rate" in out) == (run == "cached")
    assert losses[0] == losses[1]
    tier = out.split("device cache: hit rate ")[1]
    hits = int(tier.split("(")[1].split(" of ")[0].replace(",", ""))
    refreshed = int(tier.split("coherent: ")[1].split(" rows refreshed")[0].replace(",", ""))
    assert hits > 0 and refreshed > 0


def test_the_daemons_row_cache_tier_comes_from_its_metrics(tmp_path, daemon_factory) -> None:
    """model.tiers reads the daemon row cache's hits and misses through the Stats RPC: over gRPC they are the
    cache's own counts; without a row cache there is no such tier."""
    from client import ClientConfig
    from memstore.rowcache import RowCacheConfig
    from model.tiers import daemon_counters, daemon_tier

    path = create_table(tmp_path / "t", Manifest(layout=ENGRAM.layout(), dtype=DType.FLOAT16, seed=ENGRAM.seed))
    row_bytes = DType.FLOAT16.row_bytes(DIM)
    ids = np.random.default_rng(0).integers(0, 200, (5, 64))  # repeats: hits from the second lookup on
    with LiveTable.open(path, config=LiveConfig(row_cache=RowCacheConfig(bytes=1 << 16, direct_io=False))) as live:
        with MemstoreClient(daemon_factory(live).address, ClientConfig(same_host=False)) as client:
            before = daemon_counters(client)
            for step in ids:
                client.lookup(ENGRAM.layer_ids[0], step)
            tier = daemon_tier(before, daemon_counters(client), row_bytes)
        cache = live.row_cache.snapshot()
    assert tier is not None and tier.tier == "daemon row"
    assert (tier.hits, tier.misses) == (cache.hits, cache.misses) and tier.hits > 0 and tier.misses > 0
    assert tier.bytes_saved == tier.hits * row_bytes and "daemon row cache: hit rate" in tier.summary()
    with Table.open(path) as table, MemstoreClient(daemon_factory(table).address) as client:
        assert daemon_tier(daemon_counters(client), daemon_counters(client), row_bytes) is None  # no row cache
    assert daemon_counters(None) == {}


def test_the_training_report_notes_a_row_cache_read_in_place(
    data, config, tmp_path, daemon_factory, capsys, monkeypatch
) -> None:
    """`python -m model.train` on the daemon's host reads its row cache through shared memory: the daemon never
    sees those hits, so the report says so instead of showing a hit rate of its misses alone."""
    from memstore.rowcache import RowCacheConfig
    from model import train as train_cli
    from model.config import lm_config_to_dict

    monkeypatch.setattr(train_cli, "prepare_data", lambda _config: data)
    (tmp_path / "lm.json").write_text(json.dumps(lm_config_to_dict(config)))
    path = create_table(tmp_path / "t", Manifest(layout=ENGRAM.layout(), dtype=DType.FLOAT16, seed=ENGRAM.seed))
    with LiveTable.open(path, config=LiveConfig(row_cache=RowCacheConfig(bytes=1 << 16, direct_io=False))) as live:
        argv = ["--source", "memstore", "--memstore", daemon_factory(live).address, "--device", "cpu"]
        argv += ["--lm-config", str(tmp_path / "lm.json"), "--steps", "2", "--batch-size", "4", "--eval-every", "2"]
        train_cli.main([*argv, "--out", str(tmp_path / "run"), "--cache-rows", "100"])
    out = capsys.readouterr().out
    assert "device cache: hit rate" in out and "daemon row cache: hit rate" not in out
    assert "daemon row cache: read in place (same host)" in out
