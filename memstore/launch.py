"""Run `memstore serve` as a child process on a free loopback port (scripts, benchmarks, tests)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def start_daemon(
    table_path: Path, extra_args: Sequence[str] = (), startup_timeout_s: float = 60.0, **popen_kwargs: Any
) -> tuple[subprocess.Popen, str]:
    """Start `memstore serve` on 127.0.0.1:0; returns the process, once it serves, and its address."""
    with tempfile.TemporaryDirectory(prefix="memstore-") as tmp:
        port_file = Path(tmp) / "port"
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memstore",
                "serve",
                str(table_path),
                "--listen",
                "127.0.0.1:0",
                "--port-file",
                str(port_file),
                *extra_args,
            ],
            **popen_kwargs,
        )
        deadline = time.monotonic() + startup_timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"memstore serve {table_path} did not start: {_what_it_said(process)}")
            time.sleep(0.05)
        return process, f"127.0.0.1:{port_file.read_text().strip()}"


def _what_it_said(process: subprocess.Popen) -> str:
    """The exit code and whatever of stdout and stderr was captured (its error is on stderr)."""
    said = [part.decode(errors="replace") if isinstance(part, bytes) else part for part in process.communicate()]
    captured = "\n".join(part.strip() for part in said if part and part.strip())
    return f"exit code {process.returncode}: {captured or 'see its log (stderr was not captured)'}"


def stop_daemon(process: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM (graceful drain), SIGKILL if it does not exit in time; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        # A stopped process (SIGSTOP, Ctrl-Z, a debugger) acts on SIGTERM only once continued:
        # without this it would sit out the whole timeout and be killed undrained.
        process.send_signal(signal.SIGCONT)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextmanager
def daemon_process(table_path: Path, extra_args: Sequence[str] = (), **popen_kwargs: Any) -> Iterator[str]:
    """A `memstore serve` child for the duration of the block; yields its address."""
    process, address = start_daemon(table_path, extra_args, **popen_kwargs)
    try:
        yield address
    finally:
        stop_daemon(process)
