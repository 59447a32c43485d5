"""A cgroup-v1 memory group for benchmarks that put a process under a memory limit (root only).

The page cache a process in the group faults in counts against the group's limit, so a daemon
serving an mmap table larger than the limit keeps at most the limit's worth of its pages. The
group is made as a child of the group this process runs in (limits nest: nothing outside is
loosened) and removed on exit, its processes moved back to the parent first.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """Bytes from '4G', '3.5G', '512M', '1048576' (binary units, an optional trailing 'B' or 'iB')."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _UNITS and not value[-1:].isdigit() else ""
    number = value[: len(value) - len(unit)]
    try:
        result = int(float(number) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 4G, 3.5G, 512M or a number of bytes)") from None
    if result <= 0:
        raise ValueError(f"a size must be positive: {text!r}")
    return result


def parse_memory_stat(text: str) -> dict[str, int]:
    """memory.stat's `name value` lines as a dict (the group's own counters and the `total_` ones)."""
    stats = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            stats[parts[0]] = int(parts[1])
    return stats


def own_memory_group() -> Path:
    """This process's cgroup-v1 memory group directory (from /proc/self/cgroup)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / path.lstrip("/")
    raise RuntimeError("no cgroup-v1 memory controller in /proc/self/cgroup")


class MemoryGroup:
    """A child memory group with a limit; `enter_child` is a Popen preexec_fn putting the child in it.

    Use as a context manager: the group exists inside the block and is removed on leaving it
    (after its processes are moved to the parent group, which a stopped daemon no longer needs).
    """

    def __init__(self, name: str, limit_bytes: int, parent: Path | None = None) -> None:
        self.parent = parent if parent is not None else own_memory_group()
        self.path = self.parent / name
        self.limit_bytes = limit_bytes

    def __enter__(self) -> MemoryGroup:
        if self.path.exists():  # left by a run that was killed: empty it and start afresh
            self.remove()
        self.path.mkdir()
        try:
            (self.path / "memory.swappiness").write_text("0")
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
            self.limit_bytes = int((self.path / "memory.limit_in_bytes").read_text())  # rounded to pages
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def enter_child(self) -> None:
        """Move the calling process into the group (run in the child between fork and exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def stat(self) -> dict[str, int]:
        """memory.stat plus usage, max usage and failcnt (all bytes or counts)."""
        stats = parse_memory_stat((self.path / "memory.stat").read_text())
        for name in ("usage_in_bytes", "max_usage_in_bytes", "failcnt"):
            stats[name] = int((self.path / f"memory.{name}").read_text())
        return stats

    def remove(self) -> None:
        """Move the group's processes to the parent and delete the group (its page cache goes to the parent)."""
        if not self.path.exists():
            return
        for pid in self.pids():
            try:
                (self.parent / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:  # exited meanwhile
                pass
        self.path.rmdir()
