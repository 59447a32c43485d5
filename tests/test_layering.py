"""The import layers: the client carries only the wire, the table format and the errors.

The contracts themselves live in pyproject.toml ([tool.importlinter]); this runs them, and checks
what `import client` actually loads in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What a training or inference process must not load with the client: the daemon's engine,
# its storage backend and its tools.
SERVER_ONLY = (
    "memstore.live",
    "memstore.wal",
    "memstore.optim",
    "memstore.create",
    "memstore.storage.lmdb_store",
    "memstore.reshard",
    "memstore.replica",
    "memstore.service",
    "memstore.daemon",
    "memstore.dataplane.server",
    "lmdb",
    "tqdm",
    "prometheus_client",
)


def _env() -> dict[str, str]:
    # This checkout first: an editable install may point at another one.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), "--no-cache", "--no-logo"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(f"lint-imports found broken contracts:\n{result.stdout}{result.stderr}", pytrace=False)


def _loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after `statement`."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


def test_import_client_loads_no_server_module() -> None:
    # The client returns torch tensors, so torch comes with it, and what torch itself loads
    # (torch.hub imports tqdm when it is installed) is not the client's to avoid.
    added = _loaded_by("import client") - _loaded_by("import torch")
    server = sorted(m for m in added if any(m == s or m.startswith(s + ".") for s in SERVER_ONLY))
    assert server == [], f"`import client` loaded server-only modules: {server}"
