"""Say which file killed the process: a SIGBUS in a memory-mapped table file is logged before death.

A row file truncated by another process (or a full disk under a sparse mapping that was written
without reserving space) makes the next access to a missing page raise SIGBUS. Nothing can be
recovered then, but the log must say why the process died. Every mapping memstore makes (row
files of either side, same-host clients included, the sequence lock, LMDB environments) is
registered here; the compiled handler (memstore/_fatal.c) writes one line to stderr naming the
signal, the file and the offset, then lets the default action (or faulthandler's) run.

Without the compiled module (no C compiler at install) Python's faulthandler is enabled instead:
it names the signal ("Bus error") and the Python stack, not the file.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
from pathlib import Path

try:
    from memstore import _fatal as _compiled
except ImportError:  # pragma: no cover - depends on the build
    _compiled = None

log = logging.getLogger("memstore.fatal")
_lock = threading.Lock()
_installed = False


def install() -> None:
    """Install the SIGBUS reporter once per process (idempotent; also done by the first registration)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        if _compiled is not None:
            _compiled.install()
        elif not faulthandler.is_enabled():
            faulthandler.enable(file=sys.stderr, all_threads=True)
            log.info("memstore._fatal is not built: a SIGBUS is reported by faulthandler, without the file's name")


def register_mapping(address: int, length: int, path: Path | str) -> None:
    """Record that [address, address + length) maps `path`, for the SIGBUS report."""
    install()
    if _compiled is not None and address and length:
        _compiled.register_mapping(address, length, os.fsencode(os.path.abspath(path)))


def unregister_mapping(address: int) -> None:
    """Forget the mapping at `address` (it is being unmapped)."""
    if _compiled is not None and address:
        _compiled.unregister_mapping(address)
