"""Dependencies: the daemon and the client run without the optional packages; the model says how to get them.

Each check runs in a fresh interpreter where the optional packages are blocked (`sys.modules[name] = None`
makes `import name` fail as if it were not installed), so what an earlier test imported cannot hide a
dependency.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.helpers import DEADLINE_S

REPO = Path(__file__).resolve().parent.parent
OPTIONAL = ("tokenizers", "safetensors", "matplotlib")
HINT = "pip install 'engram-memstore[model]'"


def _run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter in which the optional packages cannot be imported."""
    prelude = f"import sys\nfor _name in {OPTIONAL!r}:\n    sys.modules[_name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S * 6,
    )


def test_daemon_and_client_modules_import_without_the_optional_packages() -> None:
    code = """
import importlib, pkgutil
import client, memstore
names = []
for package in (memstore, client):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # __main__ runs the CLI
            importlib.import_module(info.name)
            names.append(info.name)
print(len(names))
"""
    result = _run_blocked(code)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 20  # the walk found the modules (not an empty path)


def test_the_model_core_imports_without_tokenizers() -> None:
    # The Engram module, the hashing and the LM take a compression object but do not build one.
    result = _run_blocked("import model.engram, model.hashing, model.lm, model.sources\nprint('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_model_modules_that_need_tokenizers_say_how_to_install_it() -> None:
    for module in ("model.compression", "model.data", "model.train"):
        code = f"""
try:
    import {module}
except ModuleNotFoundError as exc:
    print(exc.name)
    print(exc)
else:
    print("imported")
"""
        result = _run_blocked(code)
        assert result.returncode == 0, result.stderr
        name, message = result.stdout.strip().split("\n", 1)
        assert name == "tokenizers", (module, result.stdout)
        assert HINT in message, (module, message)


def test_runtime_dependencies_leave_out_the_model_and_dev_packages() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(spec) for spec in project["dependencies"]}
    optional = project["optional-dependencies"]
    extras = {name: {_requirement_name(spec) for spec in specs} for name, specs in optional.items()}
    assert runtime.isdisjoint(OPTIONAL)
    assert "tokenizers" in extras["model"]
    assert {"safetensors", "matplotlib", "import-linter"} <= extras["dev"]
    # scripts/setup.sh installs requirements-dev.txt: it pins every package of every extra.
    pinned = {
        _requirement_name(line)
        for line in (REPO / "requirements-dev.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert set().union(runtime, *extras.values()) <= pinned


def _requirement_name(spec: str) -> str:
    """`redis[hiredis]>=5` -> `redis`: the distribution name of a requirement line, normalised."""
    for stop in "[<>=!~; ":
        spec = spec.split(stop, 1)[0]
    return spec.strip().lower().replace("_", "-")
