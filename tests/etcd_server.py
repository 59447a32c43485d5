"""A real etcd on loopback for tests: Debian's etcd-server 3.4, as scripts/get_etcd.sh unpacks it.

Found at $ETCD_BIN, under .deps/etcd (scripts/setup.sh runs get_etcd.sh), or on PATH; the tests that
need it skip, saying how to get it, where none can be had.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from memstore.errors import MemstoreError
from memstore.etcd import EtcdClient

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


def etcd_binary() -> str | None:
    """The etcd executable to test with, or None."""
    for candidate in (os.environ.get("ETCD_BIN"), str(REPO / ".deps" / "etcd" / "usr" / "bin" / "etcd")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("etcd")


def require_etcd() -> str:
    """The etcd binary, or a skip that says how to get it."""
    binary = etcd_binary()
    if binary is None:
        pytest.skip(
            "no etcd binary: run scripts/get_etcd.sh (Debian's etcd-server 3.4 into .deps/etcd), or set ETCD_BIN"
        )
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EtcdServer:
    """One etcd member on loopback ports of its own, with its data under `data_dir`; restartable on the
    same ports (its clients reconnect)."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        self.binary, self.data_dir = binary, data_dir
        self.client_port, self.peer_port = _free_port(), _free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self.process: subprocess.Popen | None = None
        self._log = data_dir.with_suffix(".log")

    def start(self) -> EtcdServer:
        client_url, peer_url = f"http://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        with open(self._log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--name=test",
                    f"--data-dir={self.data_dir}",
                    f"--listen-client-urls={client_url}",
                    f"--advertise-client-urls={client_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=test={peer_url}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        with EtcdClient(self.endpoint, timeout_s=1.0) as probe:
            while True:
                try:
                    probe.get(b"/")
                    return self
                except MemstoreError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"etcd did not start: {self._log.read_text()[-2000:]}") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        """Kill it (as a crash would); idempotent."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
