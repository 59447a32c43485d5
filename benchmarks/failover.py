"""Automatic failover: the time from a kill -9 of a shard's primary to the first push the new primary accepts.

    python -m benchmarks.failover [--kills 10] [--ttl-s 2] [--pushes-between 20]

A real etcd (Debian's etcd-server 3.4, scripts/get_etcd.sh) and `memstore serve --etcd --failover
--sync-replicas 1` children: a primary and two replicas of a zero-initialised SGD table. One trainer
pushes back to back through `ClusterClient.discover` (integer gradients, a step id per push, each
waiting for its acknowledgement); a reader looks rows up all along. Each round waits for
`--pushes-between` acknowledged pushes, kills the leader with SIGKILL (a push is in flight or about
to be), and times the first acknowledgement after the kill: that push was accepted by the new
leader, once N=1 replica held it. Then a new replica of the new leader replaces the killed daemon.

At the end: read failures (none expected), and whether the last leader's table holds every
acknowledged push exactly once (zero-initialised SGD, integer gradients: exact in float32).

The time is, roughly: the rest of the leader's lease (up to --ttl-s after its last renewal, which
happens every quarter of it), the election (a candidate round, a quarter of the TTL), the member
record rewrite and the client's discovery watch, and the client's retry backoff.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from client import ClientConfig, ClusterClient, MemstoreClient
from memstore.dtypes import DType
from memstore.errors import MemstoreError
from memstore.etcd import EtcdClient
from memstore.exchange import import_safetensors, tensor_name
from memstore.launch import start_daemon, stop_daemon
from memstore.layout import EngramLayout
from memstore.membership import LeaderRecord, leader_key
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind
from tests.etcd_server import EtcdServer, etcd_binary

CLUSTER = "failover-bench"
LAYOUT = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(4000, 4000), max_ngram=3, heads_per_ngram=4, dim=16)
LR = 0.5  # a power of two: -LR x an integer sum is exact in float32
MANIFEST = Manifest(
    layout=LAYOUT, dtype=DType.FLOAT32, seed=0, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=LR)
)


def _zero_table(path: Path) -> Path:
    """A float32 SGD table whose rows are all zero (zeros imported from safetensors)."""
    zeros = path.with_name(path.name + ".safetensors")
    save_file({tensor_name(1): np.zeros((LAYOUT.num_rows(1), LAYOUT.dim), np.float32)}, str(zeros))
    import_safetensors(zeros, path, manifest=MANIFEST)
    zeros.unlink()
    return path


def _push_args(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(step)
    ids = rng.choice(LAYOUT.num_rows(1), size=64, replace=False)
    return ids, rng.integers(-4, 5, (64, LAYOUT.dim)).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--ttl-s", type=int, default=2, help="--etcd-ttl-s of every daemon (the election lease)")
    parser.add_argument("--pushes-between", type=int, default=20, help="acknowledged pushes before each kill")
    parser.add_argument(
        "--throughput-s",
        type=float,
        default=0.0,
        help="first, push for this long with and without --failover (a primary, one replica, --sync-replicas 1) "
        "and report pushes/s: what the election's per-push etcd write costs",
    )
    args = parser.parse_args()
    binary = etcd_binary()
    if binary is None:
        print("no etcd: run scripts/get_etcd.sh (or set ETCD_BIN)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="failover-bench-") as tmp:
        if args.throughput_s > 0:
            for failover in (False, True, False, True):
                per_s = _throughput(Path(tmp) / f"t{failover}{time.monotonic_ns()}", binary, failover, args)
                print(f"--sync-replicas 1, {'with' if failover else 'without'} --failover: {per_s:.1f} pushes/s")
        return _bench(Path(tmp), binary, args)


def _throughput(work: Path, binary: str, failover: bool, args: argparse.Namespace) -> float:
    """Pushes/s of one trainer (64-row steps back to back) to a primary with one synchronous replica."""
    work.mkdir()
    etcd = EtcdServer(binary, work / "etcd").start()
    flags = ["--no-same-host", "--durability", "os", "--etcd", etcd.endpoint, "--cluster-name", CLUSTER]
    flags += ["--etcd-ttl-s", str(args.ttl_s), *(["--failover"] if failover else [])]
    quiet = {"stderr": subprocess.DEVNULL}
    processes = []
    try:
        primary, address = start_daemon(_zero_table(work / "p"), [*flags, "--sync-replicas", "1"], **quiet)
        processes.append(primary)
        replica, _ = start_daemon(_zero_table(work / "r"), [*flags, "--follow", address], **quiet)
        processes.append(replica)
        with MemstoreClient(address, ClientConfig(timeout_s=60.0, same_host=False)) as client:
            ids, grads = _push_args(0)
            client.push(1, ids, grads, step_id=1)  # the replica follows and reports
            step, start = 1, time.monotonic()
            while time.monotonic() - start < args.throughput_s:
                step += 1
                ids, grads = _push_args(step)
                client.push(1, ids, grads, step_id=step)
            return (step - 1) / (time.monotonic() - start)
    finally:
        for process in processes:
            stop_daemon(process)
        etcd.stop()


def _bench(work: Path, binary: str, args: argparse.Namespace) -> int:
    etcd = EtcdServer(binary, work / "etcd").start()
    processes: dict[str, subprocess.Popen] = {}
    names = iter(range(10_000))
    quiet = {"stderr": subprocess.DEVNULL}

    def start(*extra: str) -> str:
        flags = ["--no-same-host", "--durability", "os", "--etcd", etcd.endpoint, "--cluster-name", CLUSTER]
        flags += ["--etcd-ttl-s", str(args.ttl_s), "--failover", "--sync-replicas", "1", "--sync-timeout-s", "30"]
        process, address = start_daemon(_zero_table(work / f"d{next(names)}"), [*flags, *extra], **quiet)
        processes[address] = process
        return address

    acks: list[tuple[float, int, str | None]] = []  # (when, step, the primary the client used then)
    failures: list[str] = []
    read_failures: list[str] = []
    done = threading.Event()
    times: list[float] = []
    try:
        first = start()
        start("--follow", first)
        start("--follow", first)
        config = ClientConfig(timeout_s=60.0, same_host=False)
        with EtcdClient(etcd.endpoint) as store, ClusterClient.discover(etcd.endpoint, CLUSTER, config) as cluster:

            def train() -> None:
                step = 0
                while not done.is_set():
                    step += 1
                    ids, grads = _push_args(step)
                    try:
                        cluster.push(1, ids, grads, step_id=step)
                    except MemstoreError as exc:
                        failures.append(f"step {step}: {exc}")
                        return
                    acks.append((time.monotonic(), step, cluster.spec.shards[0].primary))

            def read() -> None:
                ids, _ = _push_args(0)
                while not done.is_set():
                    try:
                        cluster.lookup(1, ids)
                    except MemstoreError as exc:
                        read_failures.append(str(exc))

            threads = [threading.Thread(target=train), threading.Thread(target=read)]
            for thread in threads:
                thread.start()
            for kill in range(args.kills):
                base = len(acks)
                _wait(lambda: len(acks) >= base + args.pushes_between or failures, 120)
                leader = LeaderRecord.decode(store.get(leader_key(CLUSTER, 0)).value)
                killed_at = time.monotonic()
                processes[leader.address].kill()
                processes[leader.address].wait()
                # An acknowledgement the old leader sent just before dying may arrive after the kill: the
                # first one from the new leader is the first after the client switched primaries.
                _wait(lambda: (acks and acks[-1][2] != leader.address) or failures, 120)
                if failures:
                    break
                first_ack = next(when for when, _, used in acks if when > killed_at and used != leader.address)
                times.append(first_ack - killed_at)
                new = LeaderRecord.decode(store.get(leader_key(CLUSTER, 0)).value)
                print(
                    f"kill {kill + 1}: epoch {leader.epoch} -> {new.epoch}, first push accepted after {times[-1]:.2f} s"
                )
                start("--follow", new.address)  # the lost daemon replaced
            done.set()
            for thread in threads:
                thread.join()
            leader = LeaderRecord.decode(store.get(leader_key(CLUSTER, 0)).value)
            exact = _exact(leader.address, [step for _, step, _ in acks])
    finally:
        done.set()
        for process in processes.values():
            stop_daemon(process)
        etcd.stop()
    print(
        f"table: {LAYOUT.num_rows(1):,} rows x {LAYOUT.dim} float32, sgd; pushes of 64 rows back to back; "
        f"a primary and two replicas, --sync-replicas 1, --etcd-ttl-s {args.ttl_s}, durability os; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    if times:
        print(
            f"kills: {len(times)}; kill -> first push accepted by the new primary: "
            f"median {statistics.median(times):.2f} s, "
            f"min {min(times):.2f} s, max {max(times):.2f} s"
        )
    print(f"acknowledged pushes: {len(acks)}; push failures: {len(failures)}; read failures: {len(read_failures)}")
    print(f"every acknowledged push on the last leader, exactly once: {exact}")
    for failure in failures[:3] + read_failures[:3]:
        print(f"  {failure}")
    return 0 if exact and not failures and not read_failures and len(times) == args.kills else 1


def _exact(address: str, steps: list[int]) -> bool:
    expected = np.zeros((LAYOUT.num_rows(1), LAYOUT.dim), np.float32)
    for step in steps:
        ids, grads = _push_args(step)
        expected[ids] -= LR * grads
    with MemstoreClient(address, ClientConfig(same_host=False)) as client:
        return bool(np.array_equal(client.lookup(1, np.arange(LAYOUT.num_rows(1))), expected))


def _wait(condition, timeout_s: float) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.005)


if __name__ == "__main__":
    sys.exit(main())
