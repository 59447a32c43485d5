"""A TCP proxy that adds a fixed one-way delay, for kernels without `tc netem`.

    python -m benchmarks.delay_proxy --listen 10.99.1.3 --to 10.99.1.1 --ports 50051,50052 --delay-ms 2

Every chunk read from one side is stamped on receipt and written to the other side when
`delay` has passed: latency is added in each direction (a round trip gains 2 x delay), order is
kept, and bandwidth is kept (reading never waits for the delay, up to `max_buffered_bytes` held
per direction; a real link of that delay holds its bandwidth-delay product in flight the same
way). Each listening port forwards to the same port number on the target host, so a client that
connects to the proxy's address reaches the daemon's gRPC port and its data-plane port, whatever
port Describe advertised, through the proxy. When one side closes (or half-closes) its sending
direction, the other side sees that after the queued bytes; when a side resets or a write
fails, both sides are closed at once. Connection set-up itself is not delayed.

The proxy is a userspace copy: it costs CPU of its own. Run it in its own process, as
`proxy_process` does, so that it does not share a GIL with what is measured; there each
connection is served by a forked process of its own (a client striping a lookup over several
connections gets them copied on several cores; `fork=False` keeps them all in threads of one).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

_CHUNK = 256 << 10


class _Direction:
    """Bytes from `src` to `dst`, each chunk written `delay_s` after it was read."""

    def __init__(self, conn: _Connection, src: socket.socket, dst: socket.socket) -> None:
        self.conn, self.src, self.dst = conn, src, dst
        self.queue: deque[tuple[float, bytes]] = deque()
        self.buffered = 0
        self.eof = False
        self.cond = threading.Condition()

    def read_loop(self) -> None:
        delay, limit = self.conn.delay_s, self.conn.max_buffered_bytes
        try:
            while True:
                data = self.src.recv(_CHUNK)
                if not data:
                    break
                due = time.monotonic() + delay
                with self.cond:
                    while self.buffered >= limit and not self.conn.aborted:
                        self.cond.wait()
                    if self.conn.aborted:
                        return
                    self.queue.append((due, data))
                    self.buffered += len(data)
                    self.cond.notify_all()
        except OSError:
            self.conn.abort()
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def write_loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.eof and not self.conn.aborted:
                        self.cond.wait()
                    if self.conn.aborted or not self.queue:
                        break
                    due = self.queue[0][0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with self.cond:  # everything due by now goes in one write
                    now, parts = time.monotonic(), []
                    while self.queue and self.queue[0][0] <= now:
                        parts.append(self.queue.popleft()[1])
                    self.buffered -= sum(len(p) for p in parts)
                    self.cond.notify_all()
                if not parts:  # woke a hair early: wait again
                    continue
                self.dst.sendall(parts[0] if len(parts) == 1 else b"".join(parts))
            if not self.conn.aborted:
                self.dst.shutdown(socket.SHUT_WR)  # the source finished sending: so does this side
        except OSError:
            self.conn.abort()
        finally:
            self.conn.direction_done()


class _Connection:
    """One accepted client and its connection to the target: two delayed directions."""

    def __init__(self, client: socket.socket, upstream: socket.socket, delay_s: float, max_buffered: int) -> None:
        self.client, self.upstream = client, upstream
        self.delay_s, self.max_buffered_bytes = delay_s, max_buffered
        self.aborted = False
        self._lock = threading.Lock()
        self._open_directions = 2
        self.directions = [_Direction(self, client, upstream), _Direction(self, upstream, client)]
        self.threads = [
            threading.Thread(target=fn, daemon=True, name=f"delay-proxy-{fn.__name__}")
            for d in self.directions
            for fn in (d.read_loop, d.write_loop)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def abort(self) -> None:
        """Close both sides now (a reset, a failed write, or the proxy stopping)."""
        with self._lock:
            if self.aborted:
                return
            self.aborted = True
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for d in self.directions:
            with d.cond:
                d.cond.notify_all()

    def direction_done(self) -> None:
        with self._lock:
            self._open_directions -= 1
            last = self._open_directions == 0
        if last:
            self.abort()  # wakes readers still blocked on a half-closed socket
            for thread in self.threads:
                if thread is not threading.current_thread():
                    thread.join(5)
            self.client.close()
            self.upstream.close()


class DelayProxy:
    """Listen on `listen_host` at each of `ports`, forward to the same port on `target_host`,
    delaying every chunk by `delay_s` each way. Use as a context manager (or start/stop)."""

    def __init__(
        self,
        listen_host: str,
        target_host: str,
        ports: Sequence[int],
        delay_s: float,
        max_buffered_bytes: int = 64 << 20,
        target_ports: Sequence[int] | None = None,
        fork: bool = False,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0; got {delay_s}")
        self.delay_s, self.max_buffered_bytes = delay_s, max_buffered_bytes
        self.target_host = target_host
        # A process per connection (fork): connections striped by a client then copy on several cores,
        # not under one GIL.
        self.fork = fork
        self._children: set[int] = set()
        self._stopping = threading.Event()
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._listeners: list[tuple[socket.socket, int]] = []
        targets = list(target_ports) if target_ports is not None else list(ports)
        for port, target_port in zip(ports, targets, strict=True):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((listen_host, port))
            sock.listen(64)
            sock.settimeout(0.2)  # the accept loop checks for stop() this often
            self._listeners.append((sock, target_port))
        self.ports = [sock.getsockname()[1] for sock, _ in self._listeners]
        self._threads = [
            threading.Thread(target=self._accept_loop, args=(sock, tp), daemon=True, name="delay-proxy-accept")
            for sock, tp in self._listeners
        ]

    def start(self) -> DelayProxy:
        for thread in self._threads:
            thread.start()
        return self

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self, listener: socket.socket, target_port: int) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setblocking(True)
            try:
                upstream = socket.create_connection((self.target_host, target_port), timeout=10)
            except OSError:
                client.close()  # nothing to reach: the client sees the connection close
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.fork:
                self._fork_connection(client, upstream)
                continue
            conn = _Connection(client, upstream, self.delay_s, self.max_buffered_bytes)
            with self._lock:
                self._connections = [c for c in self._connections if not c.aborted]
                self._connections.append(conn)
            conn.start()

    def _fork_connection(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            pid = os.fork()
            if pid == 0:  # the child: this one connection, then exit
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                try:
                    # Every other descriptor inherited goes (listeners, and whatever the parent had open, such as
                    # a client's own end of a connection when the proxy runs inside the client's process).
                    keep = sorted((client.fileno(), upstream.fileno()))
                    os.closerange(3, keep[0])
                    os.closerange(keep[0] + 1, keep[1])
                    os.closerange(keep[1] + 1, os.sysconf("SC_OPEN_MAX"))
                    conn = _Connection(client, upstream, self.delay_s, self.max_buffered_bytes)
                    conn.start()
                    for thread in conn.threads:
                        thread.join()
                finally:
                    os._exit(0)
            self._children.add(pid)
            for done in [p for p in self._children if os.waitpid(p, os.WNOHANG)[0] == p]:
                self._children.discard(done)
        client.close()  # the child's now
        upstream.close()

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stopping.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(5)
        for sock, _ in self._listeners:
            sock.close()
        with self._lock:
            connections, children = list(self._connections), list(self._children)
        for conn in connections:
            conn.abort()
        for pid in children:  # each ends its connection's sockets as it dies
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


@contextmanager
def proxy_process(listen_host: str, target_host: str, ports: Sequence[int], delay_s: float) -> Iterator[None]:
    """The proxy in a child process (its own GIL) for the duration of the block."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.delay_proxy",
            "--listen",
            listen_host,
            "--to",
            target_host,
            "--ports",
            ",".join(str(p) for p in ports),
            "--delay-ms",
            str(delay_s * 1000),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "listening ..." once bound, or nothing if it failed
        if not line.startswith("listening"):
            raise RuntimeError(f"delay proxy did not start (exit code {process.wait()})")
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="address to listen on")
    parser.add_argument("--to", required=True, help="host to forward to (same port numbers)")
    parser.add_argument("--ports", required=True, help="comma-separated ports")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to every chunk")
    parser.add_argument("--threads", action="store_true", help="all connections in this process (default: forks)")
    args = parser.parse_args()
    ports = [int(p) for p in args.ports.split(",")]
    with DelayProxy(args.listen, args.to, ports, args.delay_ms / 1000, fork=not args.threads) as proxy:
        print(f"listening on {args.listen} ports {proxy.ports} -> {args.to} +{args.delay_ms:g} ms", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
