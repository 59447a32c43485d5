"""The disk-tier benchmark's helpers: sizes, memory.stat, the cgroup-v1 group, the traffic's steps."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.disk_tier import Traffic, row_cache_hits_misses, scaled_layout, steps_reaching
from benchmarks.memgroup import MemoryGroup, own_memory_group, parse_bytes, parse_memory_stat
from memstore.dtypes import DType
from model import traffic


def test_parse_bytes() -> None:
    assert parse_bytes("4G") == 4 << 30
    assert parse_bytes("3.5G") == 7 << 29
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1048576") == 1 << 20
    assert parse_bytes("64k") == 64 << 10
    for bad in ("", "G", "-1G", "0", "4X"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_parse_memory_stat() -> None:
    text = "cache 4096\nrss 8192\nhierarchical_memory_limit 9223372036854771712\ntotal_pgmajfault 17\nbogus\n"
    assert parse_memory_stat(text) == {
        "cache": 4096,
        "rss": 8192,
        "hierarchical_memory_limit": 9223372036854771712,
        "total_pgmajfault": 17,
    }


def test_scaled_layout_keeps_v41_flash_shape_and_row_size() -> None:
    layout = scaled_layout()
    v41 = traffic.V41_FLASH
    assert (layout.layer_ids, layout.max_ngram, layout.heads_per_ngram) == (v41.layer_ids, 4, 8)
    assert DType.FLOAT8_E4M3_ROWSCALE.row_bytes(layout.dim) == 264  # V4.1-Flash's 256 fp8 + 8 bytes of scale
    total = layout.total_rows * 264
    assert 15.9 * 2**30 < total < 16.1 * 2**30


def _traffic() -> tuple[Traffic, dict[int, np.ndarray]]:
    rng = np.random.default_rng(0)
    streams = {1: rng.integers(0, 50, (23, 6)).astype("<u4"), 14: rng.integers(0, 40, (23, 6)).astype("<u4")}
    return Traffic(streams, step_tokens=4, num_rows={1: 50, 14: 40}), streams


def test_traffic_steps_are_the_streams_in_order() -> None:
    work, streams = _traffic()
    assert work.steps == 5  # 23 tokens: the last 3 make no whole step
    for k in range(work.steps):
        step = work.step(k)
        assert sorted(step) == [1, 14]
        for layer, ids in step.items():
            assert ids.dtype == np.int64
            np.testing.assert_array_equal(ids, streams[layer][4 * k : 4 * k + 4].reshape(-1))
    assert work.truncated(2).steps == 2
    np.testing.assert_array_equal(work.truncated(2).step(1)[14], work.step(1)[14])


def test_distinct_growth_matches_sets() -> None:
    work, streams = _traffic()
    cumulative, per_step = work.distinct_growth()
    seen: dict[int, set[int]] = {1: set(), 14: set()}
    for k in range(work.steps):
        step_distinct = 0
        for layer in (1, 14):
            ids = set(streams[layer][4 * k : 4 * k + 4].reshape(-1).tolist())
            step_distinct += len(ids)
            seen[layer] |= ids
        assert per_step[k] == step_distinct
        assert cumulative[k] == len(seen[1]) + len(seen[14])


def test_steps_reaching() -> None:
    cumulative = np.array([3, 5, 5, 9])
    assert [steps_reaching(cumulative, t) for t in (0, 3, 4, 5, 6, 9)] == [1, 1, 2, 2, 4, 4]
    assert steps_reaching(cumulative, 10) is None


def test_row_cache_counters() -> None:
    metrics = {
        "memstore_row_cache_hits_total{layer=1}": 30.0,
        "memstore_row_cache_hits_total{layer=14}": 10.0,
        "memstore_row_cache_misses_total{layer=1}": 60.0,
        "memstore_row_cache_bytes": 1e9,
    }
    assert row_cache_hits_misses(metrics) == (40.0, 60.0)
    assert row_cache_hits_misses({"memstore_row_cache_bytes": 1.0}) is None


def _can_make_groups() -> bool:
    try:
        return os.geteuid() == 0 and os.access(own_memory_group(), os.W_OK)
    except (RuntimeError, OSError):
        return False


@pytest.mark.skipif(not _can_make_groups(), reason="needs root and a writable cgroup-v1 memory controller")
def test_memory_group_limits_a_child_and_is_removed() -> None:
    group = MemoryGroup(f"test-disk-tier-{os.getpid()}", 64 << 20)
    child = None
    with group:
        assert int((group.path / "memory.limit_in_bytes").read_text()) == 64 << 20
        child = subprocess.Popen(["sleep", "30"], preexec_fn=group.enter_child)
        try:
            assert group.pids() == [child.pid]
            assert group.stat()["usage_in_bytes"] >= 0
            path = group.path
        except BaseException:
            child.kill()
            child.wait()
            raise
    try:
        assert not path.exists()
        assert child.poll() is None  # moved out, not killed
        assert str(child.pid) in (group.parent / "cgroup.procs").read_text().split()
    finally:
        child.kill()
        child.wait()


def test_help_imports_cleanly() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.disk_tier", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "--row-cache-bytes" in out.stdout
