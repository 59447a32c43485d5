"""Mooncake's Transfer Engine (TCP transport) measured against the remote-lookup target.

A client in its own network namespace, over a veth pair, fetches random rows (64 float16 values,
128 bytes) of a page-cached table from a server in another namespace, and the same client process
runs the in-process baseline `np.take(memmap, ids, axis=0)` in the same run. Measured:

- contiguous reads of a registered remote buffer (128 KiB, 8 MiB, 32 MiB), Transfer Engine and a
  plain Python socket: what a server that gathers rows into a buffer first would move;
- lookups of 65,536 and 262,144 random rows (best of --rounds, interleaved): `np.take` (also into
  a preallocated `out=`), a plain socket (ids out, gathered rows back), Transfer Engine
  gather-then-read (ids over a control socket, the server gathers into a registered buffer, the
  client reads it with one TE read, waiting as TE does by spinning or polled with sleeps, or chunk
  by chunk while the server gathers the next chunk), and Transfer Engine scattered reads (one
  128-byte segment per row straight from the registered memmapped table);
- 1,024-row latency p50/p99 of each.

Mooncake is not a dependency of this project: make its virtualenv with scripts/get_mooncake.sh and
run this module with that interpreter (see docs/results/transfer-engine.md). Without it the module
says why and exits 0. Needs root (it creates network namespaces `mste-*`, removed at exit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

DIM = 64
ROW_BYTES = DIM * 2
SRV_ADDR = "10.88.0.1"
CLI_ADDR = "10.88.0.2"
BATCHES = (65536, 262144)
CONTIGUOUS = (128 << 10, 8 << 20, 32 << 20)
LATENCY_ROWS = 1024
# One batch call of the TCP transport queues at most this many slices per peer (its hard maximum).
MAX_QUEUED = 65535
# Sleep between status checks of a polled TE read (with the kernel's timer slack it lasts ~85 µs here).
POLL_S = 20e-6
# Request header on both sockets: opcode, row or byte count, rows per chunk.
_HEADER = struct.Struct("<BQQ")
_OP_RAW, _OP_ROWS, _OP_GATHER = 0, 1, 2


def _mooncake_error() -> str | None:
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from a missing shared library
        return f"{type(exc).__name__}: {exc}"
    return None


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "numpy": np.__version__, "kernel": platform.release()}
    for dist in ("mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    out["cpus"] = os.cpu_count()
    out["loadavg_at_start"] = os.getloadavg()[0]  # the machine is shared: other work skews every column
    out.update({k: v for k, v in os.environ.items() if k.startswith("MC_TCP_")})
    return out


def _map_table(path: str) -> np.ndarray:
    """The table as a memmap with every page already mapped in this process.

    A fresh mapping of a page-cached file still takes a minor fault on each page's first touch; left
    in, they land on whichever method touches a row first in a round and skew the comparison.
    """
    table = np.memmap(path, dtype=np.float16, mode="r").reshape(-1, DIM)
    table.reshape(-1).view(np.uint8)[::4096].sum()
    return table


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        view = view[n:]


def _engine(host: str):
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    rc = engine.initialize(host, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"TransferEngine.initialize({host!r}, P2PHANDSHAKE, tcp) returned {rc}")
    return engine


def _register(engine, array: np.ndarray) -> int:
    addr = array.ctypes.data
    rc = engine.register_memory(addr, array.nbytes)
    if rc != 0:
        raise RuntimeError(f"register_memory of {array.nbytes} bytes returned {rc}")
    return addr


# ---------------------------------------------------------------- server (its own namespace)


def _serve_conn(conn: socket.socket, table: np.ndarray, gather: np.ndarray) -> None:
    rows = gather.view(np.float16).reshape(-1, DIM)
    header = bytearray(_HEADER.size)
    try:
        while True:
            _recv_exact(conn, memoryview(header))
            op, n, chunk = _HEADER.unpack(header)
            if op == _OP_RAW:
                conn.sendall(memoryview(gather)[:n])
                continue
            ids = np.empty(n, dtype=np.int64)
            _recv_exact(conn, memoryview(ids).cast("B"))
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                out = rows[start:stop]
                # mode="clip": no buffered copy of `out` (ids come from this benchmark, in range).
                np.take(table, ids[start:stop], axis=0, out=out, mode="clip")
                if op == _OP_ROWS:
                    conn.sendall(memoryview(out).cast("B"))
                else:  # _OP_GATHER: chunk ready in the registered buffer, the client reads it with TE
                    conn.sendall(b"\x01")
    except ConnectionError:
        pass
    finally:
        conn.close()


def _accept_loop(listener: socket.socket, table: np.ndarray, gather: np.ndarray) -> None:
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_conn, args=(conn, table, gather), daemon=True).start()


def _server(args: argparse.Namespace) -> None:
    table = _map_table(args.table)
    engine = _engine(SRV_ADDR)
    gather = np.zeros(max(BATCHES) * ROW_BYTES, dtype=np.uint8)
    info = {
        "te_target": f"{SRV_ADDR}:{engine.get_rpc_port()}",
        "table_addr": _register(engine, table),
        "gather_addr": _register(engine, gather),
    }
    for name in ("ctl_port", "sock_port"):
        listener = socket.create_server((SRV_ADDR, 0))
        info[name] = listener.getsockname()[1]
        # Both paths gather into the one buffer: the client runs one request at a time.
        threading.Thread(target=_accept_loop, args=(listener, table, gather), daemon=True).start()
    print(json.dumps(info), flush=True)
    sys.stdin.read()  # the driver closes stdin to stop the server


# ---------------------------------------------------------------- client (its own namespace)


class _Client:
    """The client side of every remote method, all on one process with the baseline."""

    def __init__(self, info: dict, table: np.ndarray, chunk_rows: int) -> None:
        self.info, self.table, self.chunk_rows = info, table, chunk_rows
        self.engine = _engine(CLI_ADDR)
        self.dst = np.zeros(max(BATCHES) * ROW_BYTES, dtype=np.uint8)
        self.out = np.zeros((max(BATCHES), DIM), dtype=np.float16)
        self.dst_addr = _register(self.engine, self.dst)
        self.target = info["te_target"]
        self.ctl = socket.create_connection((SRV_ADDR, info["ctl_port"]))
        self.sock = socket.create_connection((SRV_ADDR, info["sock_port"]))
        for s in (self.ctl, self.sock):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ack = bytearray(1)

    def te_read(self, nbytes: int, offset: int = 0) -> None:
        """One TE read; transfer_sync_read waits by spinning on the transfer's status."""
        rc = self.engine.transfer_sync_read(
            self.target, self.dst_addr + offset, self.info["gather_addr"] + offset, nbytes
        )
        if rc != 0:
            raise RuntimeError(f"transfer_sync_read of {nbytes} bytes returned {rc}")

    def te_read_polled(self, nbytes: int, offset: int = 0) -> None:
        """One TE read submitted asynchronously and polled with short sleeps, leaving the core to TE's threads."""
        batch = self.engine.batch_transfer_async_read(
            self.target, [self.dst_addr + offset], [self.info["gather_addr"] + offset], [nbytes]
        )
        if batch == 0:
            raise RuntimeError(f"batch_transfer_async_read of {nbytes} bytes failed")
        while (rc := self.engine.transfer_check_status(batch)) == 0:
            time.sleep(POLL_S)
        if rc != 1:
            raise RuntimeError(f"TE read of {nbytes} bytes ended with status {rc}")

    def sock_raw(self, nbytes: int) -> None:
        self.sock.sendall(_HEADER.pack(_OP_RAW, nbytes, 0))
        _recv_exact(self.sock, memoryview(self.dst)[:nbytes])

    def rows_view(self, n: int) -> np.ndarray:
        return self.dst[: n * ROW_BYTES].view(np.float16).reshape(n, DIM)

    def np_take(self, ids: np.ndarray) -> np.ndarray:
        return np.take(self.table, ids, axis=0)

    def np_take_out(self, ids: np.ndarray) -> np.ndarray:
        # A 32 MiB result is above glibc's largest mmap threshold: np.take without out= maps and zeroes
        # fresh pages on every call, which the remote paths (preallocated buffers) never pay.
        out = self.out[: len(ids)]
        return np.take(self.table, ids, axis=0, out=out, mode="clip")

    def socket_rows(self, ids: np.ndarray) -> np.ndarray:
        self.sock.sendall(_HEADER.pack(_OP_ROWS, len(ids), self.chunk_rows) + ids.tobytes())
        _recv_exact(self.sock, memoryview(self.dst)[: len(ids) * ROW_BYTES])
        return self.rows_view(len(ids))

    def _gather(self, ids: np.ndarray, chunk: int, read) -> np.ndarray:
        self.ctl.sendall(_HEADER.pack(_OP_GATHER, len(ids), chunk) + ids.tobytes())
        for start in range(0, len(ids), chunk):
            _recv_exact(self.ctl, memoryview(self.ack))
            rows = min(chunk, len(ids) - start)
            read(rows * ROW_BYTES, start * ROW_BYTES)
        return self.rows_view(len(ids))

    def te_gather(self, ids: np.ndarray) -> np.ndarray:
        return self._gather(ids, len(ids), self.te_read)

    def te_gather_polled(self, ids: np.ndarray) -> np.ndarray:
        return self._gather(ids, len(ids), self.te_read_polled)

    def te_gather_chunked_polled(self, ids: np.ndarray) -> np.ndarray:
        return self._gather(ids, self.chunk_rows, self.te_read_polled)

    def te_scatter(self, ids: np.ndarray) -> np.ndarray:
        remote = (self.info["table_addr"] + ids * ROW_BYTES).tolist()
        local = (self.dst_addr + np.arange(len(ids), dtype=np.int64) * ROW_BYTES).tolist()
        for start in range(0, len(ids), MAX_QUEUED):
            stop = min(len(ids), start + MAX_QUEUED)
            rc = self.engine.batch_transfer_sync_read(
                self.target, local[start:stop], remote[start:stop], [ROW_BYTES] * (stop - start)
            )
            if rc != 0:
                raise RuntimeError(f"batch_transfer_sync_read of {stop - start} segments returned {rc}")
        return self.rows_view(len(ids))


def _timed(fn, *a) -> float:
    start = time.perf_counter()
    fn(*a)
    return time.perf_counter() - start


def _client(args: argparse.Namespace) -> None:
    info = json.loads(args.server_info)
    table = _map_table(args.table)
    c = _Client(info, table, args.chunk_rows)
    rng = np.random.default_rng(args.seed)
    methods = {
        "np.take in-process": c.np_take,
        "np.take, preallocated out": c.np_take_out,
        "plain socket": c.socket_rows,
        "TE gather-then-read": c.te_gather,
        "TE gather-then-read, polled": c.te_gather_polled,
        "TE gather, chunked polled reads": c.te_gather_chunked_polled,
    }
    if not args.no_scatter:
        methods["TE scattered reads"] = c.te_scatter
    out: dict = {"versions": _versions(), "correct": {}, "contiguous": {}, "lookup": {}, "latency": {}}
    c.te_read(4096)  # opens the segment (handshake) outside the timings
    ids = rng.integers(0, len(table), LATENCY_ROWS)
    expect = table[ids]
    for name, fn in methods.items():
        c.dst[:] = 0  # so a method that wrote nothing cannot pass on the previous method's rows
        out["correct"][name] = bool(np.array_equal(np.asarray(fn(ids)).view(np.uint16), expect.view(np.uint16)))

    for nbytes in CONTIGUOUS:
        reps = max(4, min(50, (256 << 20) // nbytes))
        for name, fn in (("TE read", c.te_read), ("TE read, polled", c.te_read_polled), ("plain socket", c.sock_raw)):
            fn(nbytes)
            times = sorted(_timed(fn, nbytes) for _ in range(reps))
            out["contiguous"][f"{name} {nbytes}"] = {
                "bytes": nbytes,
                "method": name,
                "reps": reps,
                "best_gbps": nbytes / times[0] / 1e9,
                "median_gbps": nbytes / times[len(times) // 2] / 1e9,
            }

    for n in BATCHES:
        best = {name: float("inf") for name in methods}
        for _ in range(args.rounds):
            ids = rng.integers(0, len(table), n)
            for name, fn in methods.items():
                best[name] = min(best[name], _timed(fn, ids))
        out["lookup"][str(n)] = {name: n / t for name, t in best.items()}
        print(
            f"  {n} rows: " + ", ".join(f"{k} {v / 1e6:.2f} M/s" for k, v in out["lookup"][str(n)].items()),
            file=sys.stderr,
            flush=True,
        )

    pool = rng.integers(0, len(table), (args.latency_iters, LATENCY_ROWS))
    for name, fn in methods.items():
        iters = args.scatter_latency_iters if name == "TE scattered reads" else args.latency_iters
        for ids in pool[:10]:
            fn(ids)
        times = np.array([_timed(fn, ids) for ids in pool[:iters]]) * 1e6
        out["latency"][name] = {
            "iters": iters,
            "p50_us": float(np.percentile(times, 50)),
            "p99_us": float(np.percentile(times, 99)),
        }
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------- driver (root namespace)


def _ip(*argv: str, check: bool = True) -> None:
    subprocess.run(["ip", *argv], check=check, capture_output=True, text=True)


class _Namespaces:
    """Two namespaces joined by a veth pair: server 10.88.0.1, client 10.88.0.2."""

    def __init__(self) -> None:
        tag = os.getpid() % 10_000_000
        self.srv, self.cli = f"mste-srv-{tag}", f"mste-cli-{tag}"
        self.veth_s, self.veth_c = f"mste{tag}s", f"mste{tag}c"

    def __enter__(self) -> _Namespaces:
        try:
            _ip("netns", "add", self.srv)
            _ip("netns", "add", self.cli)
            _ip("link", "add", self.veth_s, "type", "veth", "peer", "name", self.veth_c)
            for ns, dev, addr in ((self.srv, self.veth_s, SRV_ADDR), (self.cli, self.veth_c, CLI_ADDR)):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            self.__exit__()
            raise SystemExit(f"could not create the network namespaces (root needed): {exc.stderr.strip()}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.srv, self.cli):  # deleting a namespace deletes its veth end, and the pair with it
            _ip("netns", "delete", ns, check=False)

    def cmd(self, ns: str, role: str, *extra: str) -> list[str]:
        return ["ip", "netns", "exec", ns, sys.executable, "-m", "benchmarks.transfer_engine", "--role", role, *extra]


def _ensure_table(path: Path, gib: float) -> None:
    nbytes = int(gib * (1 << 30)) // ROW_BYTES * ROW_BYTES
    if path.exists() and path.stat().st_size == nbytes:
        return
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for start in range(0, nbytes, 64 << 20):
            f.write(rng.integers(0, 1 << 16, min(64 << 20, nbytes - start) // 2, dtype=np.uint16).tobytes())
    tmp.rename(path)


def _warm(path: Path) -> None:
    buf = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _report(res: dict, args: argparse.Namespace) -> str:
    lines = [f"versions: {json.dumps(res['versions'])}", f"correct (1k rows vs np.take): {res['correct']}", ""]
    lines += ["| contiguous read | size | best GB/s | median GB/s |", "|---|---:|---:|---:|"]
    for r in res["contiguous"].values():
        size = f"{r['bytes'] >> 20} MiB" if r["bytes"] >= 1 << 20 else f"{r['bytes'] >> 10} KiB"
        lines.append(f"| {r['method']} | {size} | {r['best_gbps']:.2f} | {r['median_gbps']:.2f} |")
    lines += [
        "",
        f"| lookup (best of {args.rounds}) | rows | M rows/s | GB/s | ratio to np.take | ratio to np.take, out= |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n, row in res["lookup"].items():
        base, base_out = row["np.take in-process"], row["np.take, preallocated out"]
        for name, rate in row.items():
            cells = (name, n, f"{rate / 1e6:.2f}", f"{rate * ROW_BYTES / 1e9:.2f}", f"{rate / base:.3f}")
            lines.append("| " + " | ".join(map(str, cells)) + f" | {rate / base_out:.3f} |")
    lines += ["", f"| {LATENCY_ROWS}-row lookup | iterations | p50 µs | p99 µs |", "|---|---:|---:|---:|"]
    for name, r in res["latency"].items():
        lines.append(f"| {name} | {r['iters']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} |")
    return "\n".join(lines)


def _driver(args: argparse.Namespace) -> int:
    err = _mooncake_error()
    if err is not None:
        print(
            f"SKIPPED: Mooncake's Transfer Engine is not importable with {sys.executable}: {err}\n"
            "Make its virtualenv with scripts/get_mooncake.sh and run this module with it "
            "(docs/results/transfer-engine.md)."
        )
        return 0
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("this benchmark creates network namespaces: run it as root, with iproute2's `ip`", file=sys.stderr)
        return 2
    # A 262,144-row batch is split into calls of at most MAX_QUEUED segments; the defaults (1,024) reject more.
    os.environ.setdefault("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", str(MAX_QUEUED))
    os.environ.setdefault("MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER", str(MAX_QUEUED))
    if args.lanes:
        os.environ["MC_TCP_LANES_PER_PEER"] = str(args.lanes)
    if args.tcp_slice_size:
        os.environ["MC_TCP_SLICE_SIZE"] = str(args.tcp_slice_size)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
    )
    workdir = Path(tempfile.mkdtemp(prefix="mste-", dir=args.workdir))
    table = Path(args.table) if args.table else workdir / "table.f16"
    log = open(workdir / "engine.log", "w")
    server = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(f"table {table} ({args.table_gib} GiB), warming the page cache", file=sys.stderr, flush=True)
        _ensure_table(table, args.table_gib)
        _warm(table)
        with _Namespaces() as ns:
            server = subprocess.Popen(
                ns.cmd(ns.srv, "server", "--table", str(table)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            ready, _, _ = select.select([server.stdout], [], [], 60)
            line = server.stdout.readline() if ready else ""
            if not line:
                raise SystemExit(f"the server did not start; its log: {workdir / 'engine.log'}")
            extra = [
                "--table",
                str(table),
                "--server-info",
                line.strip(),
                "--rounds",
                str(args.rounds),
                "--chunk-rows",
                str(args.chunk_rows),
                "--seed",
                str(args.seed),
                "--latency-iters",
                str(args.latency_iters),
                "--scatter-latency-iters",
                str(args.scatter_latency_iters),
            ]
            if args.no_scatter:
                extra.append("--no-scatter")
            client = subprocess.run(
                ns.cmd(ns.cli, "client", *extra), stdout=subprocess.PIPE, stderr=log, text=True, timeout=args.timeout
            )
            if client.returncode != 0:
                log.flush()
                tail = (workdir / "engine.log").read_text()[-3000:]
                raise SystemExit(f"the client failed ({client.returncode}); log tail:\n{tail}")
            res = json.loads(client.stdout.strip().splitlines()[-1])
            server.stdin.close()
            server.wait(timeout=30)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        log.close()
        if not args.keep:
            if not args.table:
                table.unlink(missing_ok=True)
            shutil.rmtree(workdir, ignore_errors=True)
    print(_report(res, args))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the driver (or, inside a namespace, the server or client role)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.transfer_engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--table", help="an existing table file of float16 rows of 64 (default: a fresh 2 GiB one, deleted)")
    p.add_argument("--table-gib", type=float, default=2.0, help="size of the fresh table")
    p.add_argument("--workdir", default="/var/tmp", help="where the fresh table and the engine log go")
    p.add_argument("--rounds", type=int, default=4, help="lookup rounds per batch size; the best one counts")
    p.add_argument("--chunk-rows", type=int, default=16384, help="rows per chunk of the chunked paths")
    p.add_argument("--latency-iters", type=int, default=500, help="1k-row lookups per method for p50/p99")
    p.add_argument("--scatter-latency-iters", type=int, default=50, help="the same for TE scattered reads (slow)")
    p.add_argument("--no-scatter", action="store_true", help="leave out TE scattered reads")
    p.add_argument("--lanes", type=int, default=0, help="MC_TCP_LANES_PER_PEER (TE's TCP connections per peer)")
    p.add_argument(
        "--tcp-slice-size", type=int, default=0, help="MC_TCP_SLICE_SIZE: bytes per socket read/write (TE: 65536)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="seconds the client may take")
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument("--keep", action="store_true", help="keep the work folder (engine log, fresh table)")
    p.add_argument("--role", choices=("driver", "server", "client"), default="driver", help=argparse.SUPPRESS)
    p.add_argument("--server-info", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "server":
        _server(args)
        return 0
    if args.role == "client":
        _client(args)
        return 0
    return _driver(args)


if __name__ == "__main__":
    sys.exit(main())
