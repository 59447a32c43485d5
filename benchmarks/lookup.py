"""Lookup throughput and latency through each path a client can take, side by side in one run.

    python -m benchmarks.lookup                          # full run (2 GiB table, dim 64 float16), as root
    python -m benchmarks.lookup --quick                  # small table, few calls: a smoke test
    python -m benchmarks.lookup --delays-ms 0,0.2,2      # also: remote paths through a delay proxy
    python -m benchmarks.lookup --tls                    # also: gRPC and data plane to a daemon serving TLS

For each batch size the same random ids go through five paths:
- np.take:          `np.take(memmap, ids, axis=0)` on the page-cached layer file, in this process;
- memstore gather:  memstore's own in-process row gather (`MmapRowStore.gather`, what the daemon runs);
- same-host:        `MemstoreClient` with the same-host path (the daemon's files mapped by the client);
- gRPC:             `ClientConfig(same_host=False, data_plane=False)`: rows streamed over gRPC;
- data plane:       `ClientConfig(same_host=False)` defaults: rows over the daemon's bulk data plane.
The two remote clients run in a worker process inside their own network namespace, joined to
this one by a veth pair (benchmarks/netns.py, MTU --mtu), and the daemon listens on this side of
the pair: rows cross a real network stack and no same-host shortcut is possible. Without
permission for network namespaces (not root), the worker runs on loopback, and says so.

Rounds (--rounds, default 4): every round runs each path's calls in turn (the order rotates by
one path per round); throughput is the best round's rows / median call time, p50/p99 are over
the calls of all rounds. Every path's first result is checked against np.take's rows. Each
daemon reads every row once before timing (a first read checks checksums). In the namespace, the
run also measures plain sockets over the same veth pair (one connection, and as many as the data
plane stripes a lookup over): the wire's ceiling, against np.take.

With --delays-ms, the remote clients then connect through benchmarks/delay_proxy.py (a userspace
TCP proxy adding a one-way delay to every chunk, on a second address of this side, with the
daemon's gRPC and data-plane port numbers): 1k-row latency and 64k/256k-row throughput per delay.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from benchmarks.common import REPO, ensure_table
from benchmarks.delay_proxy import proxy_process
from benchmarks.netns import (
    NetnsConfig,
    Worker,
    client_namespace,
    daemon_ports,
    netns_unavailable,
    serve_requests,
    socket_ceiling,
    start_daemon_at,
)
from client import ClientConfig, MemstoreClient
from client.client import _distinct_count
from memstore.auth import ClientTls
from memstore.codec import decode_row_ids, encode_row_ids
from memstore.launch import stop_daemon
from memstore.layout import EngramLayout
from memstore.table import Table
from memstore.wire import memstore_pb2 as pb
from memstore.wire import memstore_pb2_grpc as pb_grpc

# One layer of 8 heads of ~2.1M rows: 16.8M rows x 64 float16 = 2.0 GiB.
FULL = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(2_100_000,), max_ngram=2, heads_per_ngram=8, dim=64)
QUICK = EngramLayout(layer_ids=(1,), vocab_size_per_ngram=(100_000,), max_ngram=2, heads_per_ngram=8, dim=64)

LOCAL_PATHS = ("np.take", "memstore gather", "same-host")
# The remote clients' configs; data_plane is left out where this ClientConfig has no such field.
REMOTE_PATHS = {"gRPC": {"same_host": False, "data_plane": False}, "data plane": {"same_host": False}}
TLS_PATHS = {f"{name}, TLS": config for name, config in REMOTE_PATHS.items()}
TRANSPORT = {"gRPC": "grpc", "data plane": "data-plane", "gRPC, TLS": "grpc", "data plane, TLS": "data-plane"}


# ---- timing (both sides)


def _digest(rows: Any) -> str:
    array = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def time_calls(fn: Callable[[np.ndarray], Any], id_sets: np.ndarray) -> tuple[list[float], str]:
    """Seconds of `fn(ids)` for each row of `id_sets` (after one unmeasured call), and the digest
    of the first call's rows."""
    digest = _digest(fn(id_sets[0]))
    times = []
    for ids in id_sets:
        start = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - start)
    return times, digest


# ---- the worker: remote clients inside the namespace


def _client_config(options: dict) -> ClientConfig:
    known = {f.name for f in dataclasses.fields(ClientConfig)}
    tls = ClientTls(ca=Path(options["tls_ca"])) if options.get("tls_ca") else None
    return ClientConfig(timeout_s=120, tls=tls, **{k: v for k, v in options.items() if k in known})


class _RemoteClients:
    """The worker's state: named clients, opened and closed on request."""

    def __init__(self) -> None:
        self.clients: dict[str, tuple[MemstoreClient, int]] = {}

    def handle(self, request: dict) -> Any:
        op = request["op"]
        if op == "open":
            client = MemstoreClient(request["address"], _client_config(request["config"]))
            layer_id = int(request["layer_id"])
            client.lookup(layer_id, np.arange(8))  # connect (Describe, data-plane ticket) before timing
            self.clients[request["name"]] = (client, layer_id)
            return {"transport": getattr(client, "transport", "grpc")}
        if op == "time":
            client, layer_id = self.clients[request["name"]]
            id_sets = np.load(request["ids_file"])
            times, digest = time_calls(lambda ids: client.lookup(layer_id, ids), id_sets)
            return {"times": times, "digest": digest}
        if op == "close":
            self.clients.pop(request["name"])[0].close()
            return {}
        raise ValueError(f"unknown op {op!r}")


# ---- the parent: paths, rounds, statistics


@dataclasses.dataclass
class _Path:
    name: str
    run: Callable[[Path, np.ndarray], tuple[list[float], str]]  # (ids file, ids) -> (seconds, digest)


def _local_path(name: str, fn: Callable[[np.ndarray], Any]) -> _Path:
    return _Path(name, lambda _file, id_sets: time_calls(fn, id_sets))


def _remote_path(worker: Worker, name: str, client_name: str) -> _Path:
    def run(ids_file: Path, _ids: np.ndarray) -> tuple[list[float], str]:
        reply = worker.request({"op": "time", "name": client_name, "ids_file": str(ids_file)})
        return reply["times"], reply["digest"]

    return _Path(name, run)


def _stats(rounds: list[list[float]], batch: int, row_bytes: int) -> dict[str, Any]:
    medians = [float(np.median(r)) for r in rounds]
    pooled = np.concatenate([np.asarray(r) for r in rounds])
    best = min(medians)
    return {
        "rows_per_s": batch / best,
        "gb_per_s": batch * row_bytes / best / 1e9,
        "round_rows_per_s": [batch / m for m in medians],
        "p50_ms": float(np.percentile(pooled, 50)) * 1e3,
        "p99_ms": float(np.percentile(pooled, 99)) * 1e3,
        "calls": int(pooled.size),
    }


def measure(
    paths: list[_Path], batch: int, calls: int, rounds: int, table: Table, expected: Callable, work: Path, seed: int
) -> dict[str, dict]:
    """Each path's statistics at one batch size, with the same ids for all (rotating order per round)."""
    num_rows = table.store(table.manifest.layout.layer_ids[0]).num_rows
    id_sets = np.random.default_rng(seed).integers(0, num_rows, (calls, batch))
    ids_file = work / f"ids-{batch}-{seed}.npy"
    np.save(ids_file, id_sets)
    want = _digest(expected(id_sets[0]))
    times: dict[str, list[list[float]]] = {p.name: [] for p in paths}
    for r in range(rounds):
        for path in paths[r % len(paths) :] + paths[: r % len(paths)]:
            seconds, digest = path.run(ids_file, id_sets)
            if digest != want:
                raise RuntimeError(f"{path.name} returned other rows than np.take at {batch:,} rows")
            times[path.name].append(seconds)
    ids_file.unlink()
    return {name: _stats(t, batch, _row_bytes(table)) for name, t in times.items()}


def _calls(batch: int, calls_small: int) -> int:
    if batch <= 4096:
        return calls_small
    return 20 if batch <= 65_536 else 10 if batch <= 262_144 else 4


# ---- daemon, namespace, proxy


@contextmanager
def _network(use_netns: bool, mtu: int) -> Iterator[tuple[str, str, Any]]:
    """(daemon host, proxy host, namespace or None): a client namespace, or plain loopback."""
    if use_netns:
        with client_namespace(NetnsConfig(mtu=mtu)) as ns:
            yield ns.host_ip, ns.proxy_ip, ns
    else:
        yield "127.0.0.1", "127.0.0.2", None


@contextmanager
def _worker(ns: Any) -> Iterator[Worker]:
    if ns is not None:
        with ns.worker("benchmarks.lookup", ["--worker"]) as worker:
            yield worker
        return
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.lookup", "--worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        yield Worker(process)
    finally:
        process.stdin.close()  # type: ignore[union-attr]
        process.wait(30)


def _open_remote(
    worker: Worker,
    address: str,
    layer_id: int,
    suffix: str = "",
    kinds: dict = REMOTE_PATHS,
    tls_ca: Path | None = None,
) -> list[tuple[str, str]]:
    """Open the gRPC and data-plane clients in the worker; (path name, client name) of those that
    run on the transport they are named after (no data plane offered: that path is left out)."""
    opened = []
    for name, config in kinds.items():
        if tls_ca is not None:
            config = {**config, "tls_ca": str(tls_ca)}
        client_name = name + suffix
        reply = worker.request(
            {"op": "open", "name": client_name, "address": address, "config": config, "layer_id": layer_id}
        )
        if reply["transport"] != TRANSPORT[name]:
            print(f"({name} left out: the client uses {reply['transport']!r})", flush=True)
            worker.request({"op": "close", "name": client_name})
            continue
        opened.append((name, client_name))
    return opened


# ---- output


def _print_main(results: list[dict]) -> None:
    names = [n for n in (*LOCAL_PATHS, *REMOTE_PATHS, *TLS_PATHS) if n in results[0]["paths"]]
    print("Throughput, Mrows/s (best of the rounds), and as a share of np.take's in the same run:\n")
    print("| batch | " + " | ".join(names) + " | " + " | ".join(f"{n} / np.take" for n in names[1:]) + " |")
    print("|---:|" + "---:|" * (2 * len(names) - 1))
    for r in results:
        p, base = r["paths"], r["paths"]["np.take"]["rows_per_s"]
        cells = [f"{p[n]['rows_per_s'] / 1e6:.2f}" for n in names]
        ratios = [f"{p[n]['rows_per_s'] / base:.0%}" for n in names[1:]]
        print(f"| {r['batch']:,} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print("\nLatency per call, p50 / p99 ms (calls of all rounds):\n")
    print("| batch | calls | " + " | ".join(names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for r in results:
        p = r["paths"]
        cells = [f"{p[n]['p50_ms']:.3f} / {p[n]['p99_ms']:.3f}" for n in names]
        print(f"| {r['batch']:,} | {p['np.take']['calls']:,} | " + " | ".join(cells) + " |")
    print(flush=True)


def _print_ceiling(out: dict, ns: Any, table: Table, results: list[dict]) -> None:
    """What the wire itself allows: plain sockets over the same veth pair, over one TCP connection and over
    as many as the data plane stripes a large lookup over, in rows/s and against np.take."""
    streams = sorted({1, getattr(ClientConfig(), "data_plane_streams", 1)})
    print(f"Plain Python sockets over the same veth pair (MTU {ns.mtu}, 128 MiB, best of 4), the wire's ceiling:")
    out["plain_socket_gb_per_s"] = {}
    for n in streams:
        gb_per_s = socket_ceiling(ns, 128, streams=n)
        out["plain_socket_gb_per_s"][n] = gb_per_s
        rows_per_s = gb_per_s * 1e9 / _row_bytes(table)
        shares = ", ".join(f"{rows_per_s / r['paths']['np.take']['rows_per_s']:.0%} at {r['batch']:,}" for r in results)
        print(
            f"- {n} connection{'s' if n > 1 else ''}: {gb_per_s:.2f} GB/s = {rows_per_s / 1e6:.1f} Mrows/s of "
            f"{_row_bytes(table)}-byte rows; of np.take: {shares}"
        )
    print(flush=True)


def _print_delays(results: list[dict]) -> None:
    print("Through the delay proxy (one-way delay added each way; best-of-rounds throughput, pooled p50/p99):\n")
    print("| one-way delay | path | 1k p50 ms | 1k p99 ms | 64k Mrows/s | 64k GB/s | 256k Mrows/s | 256k GB/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for name, s in r["paths"].items():
            cells = [f"{s[1024]['p50_ms']:.3f}", f"{s[1024]['p99_ms']:.3f}"]
            for batch in (65_536, 262_144):
                cells += [f"{s[batch]['rows_per_s'] / 1e6:.2f}", f"{s[batch]['gb_per_s']:.2f}"]
            print(f"| {r['delay_ms']:g} ms | {name} | " + " | ".join(cells) + " |")
    print(flush=True)


# ---- sections


def breakdown(table: Table, address: str, batch: int, chunk_bytes: int) -> dict[str, float]:
    """Milliseconds of each step of a gRPC lookup, each run alone (the wire step against the daemon)."""
    layer_id = table.manifest.layout.layer_ids[0]
    store = table.store(layer_id)
    ids = np.random.default_rng(1).integers(0, store.num_rows, batch)
    row_bytes = table.manifest.layout.dim * table.manifest.dtype.itemsize
    chunk_rows = max(1, chunk_bytes // row_bytes)
    payload = encode_row_ids(ids)
    gathered = [store.gather(ids[s : s + chunk_rows]) for s in range(0, batch, chunk_rows)]
    messages = [pb.LookupResponse(rows=g.tobytes()).SerializeToString() for g in gathered]
    out = np.empty((batch, table.manifest.layout.dim), dtype=table.manifest.dtype.numpy)
    channel = grpc.insecure_channel(address, options=ClientConfig().channel_options())
    stub = pb_grpc.MemstoreStub(channel)
    request = pb.LookupRequest(layer_id=layer_id, row_ids=payload)

    def client_copy() -> None:
        offset = 0
        for m in messages:
            chunk = np.frombuffer(pb.LookupResponse.FromString(m).rows, dtype=out.dtype)
            out.reshape(-1)[offset : offset + len(chunk)] = chunk
            offset += len(chunk)

    steps = {
        "client: count distinct ids (np.sort)": lambda: _distinct_count(ids),
        "client: encode ids": lambda: encode_row_ids(ids),
        "server: decode ids": lambda: decode_row_ids(payload),
        # One chunk alive at a time, as in the server's stream (holding all would measure page faults).
        "server: gather rows": lambda: [
            store.gather(ids[s : s + chunk_rows]).shape for s in range(0, batch, chunk_rows)
        ],
        "server: tobytes + serialize": lambda: [
            len(pb.LookupResponse(rows=g.tobytes()).SerializeToString()) for g in gathered
        ],
        "client: parse + copy to output": client_copy,
        "whole call through the raw stub (server work + gRPC transport, no client work)": lambda: [
            m.rows for m in stub.Lookup(request, timeout=60)
        ],
    }
    result = {}
    for name, fn in steps.items():
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        result[name] = (time.perf_counter() - start) / 3 * 1e3
    channel.close()
    return result


def _delays(args: argparse.Namespace, worker: Worker, hosts: tuple[str, str], table: Table, work: Path) -> list[dict]:
    """gRPC vs. data plane through the delay proxy, per one-way delay: a daemon of its own, which
    tells clients to reach its data plane at the proxy's address (`--data-plane-advertise`, as behind
    any proxy or NAT), so that both of a client's connections cross the proxy."""
    daemon_host, proxy_host = hosts
    advertise = ["--data-plane-advertise", proxy_host, *args.daemon_args.split()]
    daemon, address = start_daemon_at(daemon_host, table.path, advertise, stderr=subprocess.DEVNULL)
    try:
        _warm_daemon(address, table)
        return _through_proxy(args, worker, hosts, table, work, daemon_ports(address))
    finally:
        stop_daemon(daemon)


def _through_proxy(
    args: argparse.Namespace, worker: Worker, hosts: tuple[str, str], table: Table, work: Path, ports: list[int]
) -> list[dict]:
    daemon_host, proxy_host = hosts
    layer_id = table.manifest.layout.layer_ids[0]
    plain = _plain_memmap(table, layer_id)
    grpc_port = ports[0]
    results = []
    for delay_ms in [float(d) for d in args.delays_ms.split(",") if d.strip()]:
        with proxy_process(proxy_host, daemon_host, ports, delay_ms / 1000):
            suffix = f" +{delay_ms:g}ms"
            opened = _open_remote(worker, f"{proxy_host}:{grpc_port}", layer_id, suffix)
            paths = [_remote_path(worker, name, client) for name, client in opened]
            per_path: dict[str, dict] = {p.name: {} for p in paths}
            for batch in (1024, 65_536, 262_144):
                calls = _calls(batch, args.calls_small)
                expected = lambda ids: np.take(plain, ids, axis=0)  # noqa: E731
                for name, s in measure(paths, batch, calls, args.rounds, table, expected, work, 7).items():
                    per_path[name][batch] = s
            for _, client in opened:
                worker.request({"op": "close", "name": client})
        for name, s in per_path.items():
            # A round trip crosses the proxy twice: anything faster went around it.
            if s[1024]["p50_ms"] < 2 * delay_ms:
                raise RuntimeError(f"{name} at +{delay_ms:g} ms: p50 {s[1024]['p50_ms']:.3f} ms bypassed the proxy")
        results.append({"delay_ms": delay_ms, "paths": per_path})
    return results


def _warm_daemon(address: str, table: Table, tls_ca: Path | None = None) -> float:
    """Read every row once through the daemon (seconds taken): a daemon checks each block's checksums on its
    first read, which on this 2 GiB table slows lookups for the first ~15 s of random reads; the benchmark
    measures the steady state a long-running daemon is in."""
    tls = ClientTls(ca=tls_ca) if tls_ca is not None else None
    start = time.perf_counter()
    with MemstoreClient(address, ClientConfig(timeout_s=300, same_host=False, data_plane=False, tls=tls)) as client:
        for layer_id in table.manifest.layout.layer_ids:
            num_rows = table.store(layer_id).num_rows
            for first in range(0, num_rows, 1 << 20):
                client.lookup(layer_id, np.arange(first, min(first + (1 << 20), num_rows)))
    return time.perf_counter() - start


def _row_bytes(table: Table) -> int:
    return table.manifest.layout.dim * table.manifest.dtype.itemsize


def _plain_memmap(table: Table, layer_id: int) -> np.memmap:
    store = table.store(layer_id)
    return np.memmap(
        table.path / table.manifest.layer_file(layer_id),
        dtype=table.manifest.dtype.numpy,
        mode="r",
        shape=(store.num_rows, store.dim),
    )


def _tls_files(work: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for `hosts`: (CA, certificate, key) PEM files."""
    import trustme  # a development dependency, needed only with --tls

    ca = trustme.CA()
    issued = ca.issue_cert(*hosts)
    files = (work / "ca.pem", work / "server.pem", work / "server.key")
    ca.cert_pem.write_to_path(str(files[0]))
    issued.cert_chain_pems[0].write_to_path(str(files[1]))
    issued.private_key_pem.write_to_path(str(files[2]))
    files[2].chmod(0o600)
    return files


def run(args: argparse.Namespace, path: Path) -> dict:
    """The whole benchmark; its results (also printed as tables)."""
    batches = [int(b) for b in args.batches.split(",")]
    use_netns = not args.no_netns
    if use_netns and (why := netns_unavailable()) is not None:
        print(f"no client namespace ({why}): the remote clients run on loopback\n", flush=True)
        use_netns = False
    out: dict[str, Any] = {"mtu": args.mtu if use_netns else None, "netns": use_netns}
    with (
        Table.open(path) as table,
        _network(use_netns, args.mtu) as (daemon_host, proxy_host, ns),
        tempfile.TemporaryDirectory(prefix="lookup-ids-") as tmp,
    ):
        work = Path(tmp)
        layer_id = table.manifest.layout.layer_ids[0]
        store = table.store(layer_id)
        plain = _plain_memmap(table, layer_id)
        extra = args.daemon_args.split()
        daemon, address = start_daemon_at(daemon_host, path, extra, stderr=subprocess.DEVNULL)
        tls_daemon = None
        try:
            if args.tls:  # a second daemon on the same table, serving TLS (gRPC and data plane)
                ca, cert, key = _tls_files(work, [daemon_host, proxy_host])
                tls_args = ["--tls-cert", str(cert), "--tls-key", str(key), *extra]
                tls_daemon, tls_address = start_daemon_at(daemon_host, path, tls_args, stderr=subprocess.DEVNULL)
                _warm_daemon(tls_address, table, ca)
            warm_s = _warm_daemon(address, table)
            where = f"a network namespace over veth, MTU {args.mtu}" if ns else "loopback (no namespace)"
            flags = f" (memstore serve {args.daemon_args})" if args.daemon_args else ""
            print(f"daemon at {address}{flags}; remote clients in {where}", flush=True)
            print(f"every row read once through the daemon first (checksums checked): {warm_s:.1f} s\n", flush=True)
            with (
                MemstoreClient(address, ClientConfig(timeout_s=120, same_host=True)) as same_host,
                _worker(ns) as worker,
            ):
                same_host.lookup(layer_id, np.arange(8))
                opened = _open_remote(worker, address, layer_id)
                if args.tls:
                    opened += _open_remote(worker, tls_address, layer_id, kinds=TLS_PATHS, tls_ca=ca)
                paths = [
                    _local_path("np.take", lambda ids: np.take(plain, ids, axis=0)),
                    _local_path("memstore gather", store.gather),
                    _local_path("same-host", lambda ids: same_host.lookup(layer_id, ids)),
                    *[_remote_path(worker, name, client) for name, client in opened],
                ]
                results = []
                for batch in batches:
                    calls = _calls(batch, args.calls_small)
                    expected = lambda ids: np.take(plain, ids, axis=0)  # noqa: E731
                    stats = measure(paths, batch, calls, args.rounds, table, expected, work, 0)
                    results.append({"batch": batch, "paths": stats})
                    print(f"  {batch:,} rows done", flush=True)
                out["lookup"] = results
                print()
                _print_main(results)
                if ns is not None:
                    _print_ceiling(out, ns, table, results)
                for _, client in opened:
                    worker.request({"op": "close", "name": client})
                if args.delays_ms:
                    out["delays"] = _delays(args, worker, (daemon_host, proxy_host), table, work)
                    _print_delays(out["delays"])
            if not args.no_breakdown:
                steps = breakdown(table, address, 262_144, 1 << 20)
                out["grpc_breakdown_ms"] = steps
                print("Where a 262,144-row gRPC lookup spends its time (each step alone, ms):")
                for name, ms in steps.items():
                    print(f"- {name}: {ms:.2f}")
        finally:
            stop_daemon(daemon)
            if tls_daemon is not None:
                stop_daemon(tls_daemon)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small table and few calls (smoke test)")
    parser.add_argument("--table", type=Path, default=None, help="table directory (created if missing)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls-small", type=int, default=1000, help="calls per round at batches up to 4k rows")
    parser.add_argument("--batches", default="1024,65536,262144,1048576")
    parser.add_argument("--mtu", type=int, default=NetnsConfig.mtu, help="of the veth pair (65535: like loopback)")
    parser.add_argument("--no-netns", action="store_true", help="remote clients on loopback, no namespace")
    parser.add_argument("--delays-ms", default="", help="one-way delays for the proxy section, e.g. 0,0.2,2")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the gRPC time breakdown")
    parser.add_argument("--tls", action="store_true", help="also gRPC and data plane to a second daemon serving TLS")
    parser.add_argument("--daemon-args", default="", help="more `memstore serve` flags, e.g. '--no-integrity'")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the remote clients' process
    args = parser.parse_args()
    if args.worker:
        serve_requests(_RemoteClients().handle)
        return 0
    layout = QUICK if args.quick else FULL
    if args.quick:
        args.calls_small = min(args.calls_small, 100)
    path = args.table or REPO / "bench-out" / ("lookup-quick" if args.quick else "lookup-2gib")
    manifest = ensure_table(path, layout)
    print(
        f"table {path}: {layout.total_rows:,} rows x {layout.dim} {manifest.dtype.value} = "
        f"{manifest.total_bytes / 2**30:.2f} GiB; torch threads {torch.get_num_threads()}; {args.rounds} rounds\n",
        flush=True,
    )
    out = run(args, path)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
