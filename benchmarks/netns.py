"""A client network namespace joined to this one by a veth pair, for benchmarks that must cross a
real network stack (no shared-memory or same-host shortcut can pose as the network).

    with client_namespace(NetnsConfig(mtu=1500)) as ns:
        daemon, address = start_daemon_at(ns.host_ip, table_path)   # listens on the veth
        result = ns.run_json("benchmarks.some_module", ["--connect", address])
        with ns.worker("benchmarks.lookup", ["--worker"]) as worker:   # a long-lived client
            reply = worker.request({"op": "...", ...})

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN): `netns_unavailable()` says why not, for callers that
skip. Names are `msb-<pid>-<n>` (namespace) and `msb<pid>x<n>h` / `...c` (veth ends); addresses
10.99.N.1 (this side), 10.99.N.2 (the namespace) and 10.99.N.3 (a second address on this side, for
a delay proxy), N the first /24 not routed here. Everything is removed on leaving the block, on an
exception, on SIGINT (KeyboardInterrupt) and on SIGTERM (turned into SystemExit while the block
runs); `remove_stale()` removes what a process killed by SIGKILL left behind.

The veth MTU matters: at 65535 a veth pair behaves like loopback (plain Python sockets move
~4 GB/s on this machine against ~2.3 GB/s at 1500), so the default is an Ethernet-like 1500.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from memstore.launch import start_daemon

PREFIX = "msb"
_counter = itertools.count()


@dataclass(frozen=True)
class NetnsConfig:
    """How the client namespace is made."""

    mtu: int = 1500  # of both veth ends; 65535 makes the pair behave like loopback
    subnet: int | None = None  # N of 10.99.N.0/24; None: the first one with no route here

    def __post_init__(self) -> None:
        if not 68 <= self.mtu <= 65535:
            raise ValueError(f"NetnsConfig.mtu must be in 68..65535; got {self.mtu}")
        if self.subnet is not None and not 0 <= self.subnet <= 255:
            raise ValueError(f"NetnsConfig.subnet must be in 0..255; got {self.subnet}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """None when this process may create network namespaces and veth pairs, else why not."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    name = f"{PREFIX}-probe-{os.getpid()}"
    try:
        made = _ip("netns", "add", name, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"cannot run `ip`: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        a, b = f"{PREFIX}p{os.getpid()}a", f"{PREFIX}p{os.getpid()}b"
        veth = _ip("link", "add", a, "type", "veth", "peer", "name", b, check=False)
        if veth.returncode != 0:
            return f"`ip link add ... type veth` failed: {veth.stderr.strip()}"
        _ip("link", "del", a, check=False)
        return None
    finally:
        _ip("netns", "del", name, check=False)


def remove_stale() -> list[str]:
    """Delete the namespaces (and so their veth pairs) of this harness whose process is gone."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == PREFIX and parts[1].isdigit() and not Path(f"/proc/{parts[1]}").exists():
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet() -> int:
    routes = _ip("-4", "route", "show", "table", "all", check=False).stdout
    addresses = _ip("-4", "-o", "addr", "show", check=False).stdout
    for n in itertools.chain(range(os.getpid() % 200 + 1, 255), range(1, 255)):
        if f"10.99.{n}." not in routes and f"10.99.{n}." not in addresses:
            return n
    raise RuntimeError("no free 10.99.N.0/24 subnet for the benchmark's veth pair")


@dataclass(frozen=True)
class Namespace:
    """A client namespace: run commands in it, reach this side at `host_ip` (or `proxy_ip`)."""

    name: str
    host_veth: str
    ns_veth: str
    host_ip: str  # this side of the pair: where a daemon for the namespace's clients listens
    client_ip: str  # the namespace's side
    proxy_ip: str  # a second address on this side, where a delay proxy listens
    mtu: int

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` as a command line that runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def python(self, module: str, args: Sequence[str] = ()) -> list[str]:
        """`python -m module args` (this interpreter) inside the namespace."""
        return self.command([sys.executable, "-m", module, *args])

    def run_json(self, module: str, args: Sequence[str] = (), timeout_s: float = 600.0) -> Any:
        """Run `python -m module args` in the namespace; the JSON of the last line it printed.
        Raises RuntimeError with its stderr when it fails."""
        done = subprocess.run(self.python(module, args), capture_output=True, text=True, timeout=timeout_s)
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"{module} in {self.name} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return json.loads(lines[-1])

    @contextmanager
    def worker(self, module: str, args: Sequence[str] = ()) -> Iterator[Worker]:
        """A long-lived `python -m module args` in the namespace that answers requests (its module
        calls `serve_requests`); stopped (stdin closed, then killed) on leaving the block."""
        process = subprocess.Popen(
            self.python(module, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        try:
            yield Worker(process)
        finally:
            _stop(process)


class Worker:
    """The parent's end of a `serve_requests` loop: one JSON request, one JSON reply."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    def request(self, message: dict, timeout_s: float = 600.0) -> Any:
        """Send `message`; its reply. RuntimeError if the worker failed or died."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = _readline(self.process.stdout, timeout_s)
        if not line:
            raise RuntimeError(f"worker exited ({self.process.poll()}) without replying to {message.get('op')}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker failed on {message.get('op')}: {reply['error']}")
        return reply["result"]


def _readline(stream: TextIO, timeout_s: float) -> str:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if reader.is_alive():
        raise TimeoutError(f"no reply from the worker in {timeout_s:g} s")
    return line[0]


def serve_requests(handle: Any) -> None:
    """The worker's loop: each stdin line is a JSON request, answered on stdout with
    {"result": handle(request)} or {"error": "..."}. Anything else the process prints goes to
    stderr, so libraries that print cannot corrupt the replies."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = {"result": handle(json.loads(line))}
        except Exception as exc:  # noqa: BLE001 - any failure goes back to the parent, which raises it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")


def _stop(process: subprocess.Popen) -> None:
    if process.stdin:
        try:
            process.stdin.close()
        except OSError:
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit in the main thread while the block runs, so `finally` cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def client_namespace(config: NetnsConfig = NetnsConfig()) -> Iterator[Namespace]:
    """A fresh namespace with lo up and a veth pair to this namespace; removed on leaving."""
    pid, n = os.getpid(), next(_counter)
    with _sigterm_as_exit():
        subnet = config.subnet if config.subnet is not None else _free_subnet()
        ns = Namespace(
            name=f"{PREFIX}-{pid}-{n}",
            host_veth=f"{PREFIX}{pid}x{n}h",
            ns_veth=f"{PREFIX}{pid}x{n}c",
            host_ip=f"10.99.{subnet}.1",
            client_ip=f"10.99.{subnet}.2",
            proxy_ip=f"10.99.{subnet}.3",
            mtu=config.mtu,
        )
        try:
            try:
                _ip("netns", "add", ns.name)
                _ip("link", "add", ns.host_veth, "mtu", str(ns.mtu), "type", "veth", "peer", "name", ns.ns_veth)
                _ip("link", "set", ns.ns_veth, "netns", ns.name)
                _ip("addr", "add", f"{ns.host_ip}/24", "dev", ns.host_veth)
                _ip("addr", "add", f"{ns.proxy_ip}/24", "dev", ns.host_veth)
                _ip("link", "set", ns.host_veth, "up")
                inside = ["-n", ns.name]
                _ip(*inside, "link", "set", "lo", "up")
                _ip(*inside, "link", "set", ns.ns_veth, "mtu", str(ns.mtu))
                _ip(*inside, "addr", "add", f"{ns.client_ip}/24", "dev", ns.ns_veth)
                _ip(*inside, "link", "set", ns.ns_veth, "up")
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(f"setting up {ns.name} failed: {' '.join(exc.cmd)}: {exc.stderr.strip()}") from exc
            yield ns
        finally:
            _ip("link", "del", ns.host_veth, check=False)  # takes its peer with it
            _ip("netns", "del", ns.name, check=False)


def start_daemon_at(host: str, table_path: Path, extra_args: Sequence[str] = (), **popen_kwargs: Any):
    """`memstore serve` listening on `host` (a free port); the process and its HOST:PORT address."""
    process, loopback = start_daemon(table_path, ["--listen", f"{host}:0", *extra_args], **popen_kwargs)
    return process, f"{host}:{loopback.rsplit(':', 1)[1]}"


def daemon_ports(address: str) -> list[int]:
    """The daemon's gRPC port, then its data plane's when Describe offers one (what a proxy must carry)."""
    import grpc

    from memstore.wire import memstore_pb2 as pb
    from memstore.wire import memstore_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.MemstoreStub(channel).Describe(pb.DescribeRequest(), timeout=30)
    ports = [int(address.rsplit(":", 1)[1])]
    if response.HasField("data_plane"):
        ports.append(response.data_plane.port)
    return ports


def _receive(address: str, nbytes: int, streams: int = 1) -> dict:
    """Receive `nbytes` from `address` over `streams` connections (part i of the bytes on the
    connection that sent the byte i first), each into its slice of one preallocated buffer with
    `recv_into`; timing and a digest of the whole."""
    import hashlib

    host, port = address.rsplit(":", 1)
    view = memoryview(bytearray(nbytes))
    bounds = [nbytes * i // streams for i in range(streams + 1)]
    socks = [socket.create_connection((host, int(port)), timeout=60) for _ in range(streams)]
    got = [0] * streams

    def receive(i: int) -> None:
        part = view[bounds[i] : bounds[i + 1]]
        while got[i] < len(part):
            n = socks[i].recv_into(part[got[i] :], min(len(part) - got[i], 4 << 20))
            if n == 0:
                break
            got[i] += n

    threads = [threading.Thread(target=receive, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for i, sock in enumerate(socks):
        sock.sendall(bytes([i]))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for sock in socks:
        sock.close()
    return {"bytes": sum(got), "seconds": elapsed, "sha256": hashlib.sha256(view).hexdigest()}


def _serve_bytes(host: str, payload: bytes, streams: int = 1) -> tuple[socket.socket, threading.Thread]:
    """A server on `host` for one `_receive` of `payload` over `streams` connections; then it closes."""
    server = socket.create_server((host, 0))
    bounds = [len(payload) * i // streams for i in range(streams + 1)]
    view = memoryview(payload)

    def send(conn: socket.socket) -> None:
        with conn:
            i = conn.recv(1)[0]
            conn.sendall(view[bounds[i] : bounds[i + 1]])

    def serve() -> None:
        with server:
            senders = [threading.Thread(target=send, args=(server.accept()[0],)) for _ in range(streams)]
            for thread in senders:
                thread.start()
            for thread in senders:
                thread.join()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def socket_ceiling(ns: Namespace, mib: int = 256, rounds: int = 4, streams: int = 1) -> float:
    """Best of `rounds` of plain-socket GB/s from this side to the namespace over `streams` TCP
    connections at once (`recv_into` one preallocated buffer there, a thread per connection on
    each side): what a TCP transport in Python with as many streams can hope for over this pair."""
    payload = os.urandom(1 << 20) * mib
    best = 0.0
    for _ in range(rounds):
        server, thread = _serve_bytes(ns.host_ip, payload, streams)
        port = server.getsockname()[1]
        args = ["--mib", str(mib), "--streams", str(streams), "--receive", f"{ns.host_ip}:{port}"]
        got = ns.run_json("benchmarks.netns", args)
        thread.join(60)
        best = max(best, got["bytes"] / got["seconds"] / 1e9)
    return best


def main() -> int:
    """Plain-socket throughput from this namespace to a client namespace over the veth pair."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--mtu", type=int, default=NetnsConfig.mtu)
    parser.add_argument("--mib", type=int, default=256, help="bytes sent per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--streams", type=int, default=1, help="TCP connections at once")
    parser.add_argument("--receive", metavar="HOST:PORT", help=argparse.SUPPRESS)  # the namespace's side
    args = parser.parse_args()
    if args.receive:
        print(json.dumps(_receive(args.receive, args.mib << 20, args.streams)))
        return 0
    with client_namespace(NetnsConfig(mtu=args.mtu)) as ns:
        best = socket_ceiling(ns, args.mib, args.rounds, args.streams)
        print(
            f"veth MTU {ns.mtu}: plain sockets {best:.2f} GB/s over {args.streams} connection(s) "
            f"(best of {args.rounds}, {args.mib} MiB each)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
