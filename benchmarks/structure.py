"""What importing the client costs, and how large the modules are, for one source tree.

    python -m benchmarks.structure                      # this checkout
    python -m benchmarks.structure --tree /tmp/old      # another checkout (e.g. `git worktree add /tmp/old REV`)

For `import client` it starts a fresh interpreter per run (the tree first on sys.path) and reports
the median wall time of the import, the modules it leaves in sys.modules (all, and the project's own),
and which server-side modules and heavy dependencies it loaded. Torch dominates the time: a
training or inference process has paid for it already, so the time without torch is reported too
(torch imported before the clock starts). For the sources it reports lines per module.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# Server-side modules and dependencies a training or inference process should not have to load.
SERVER_SIDE = [
    "memstore.live",
    "memstore.wal",
    "memstore.optim",
    "memstore.create",
    "memstore.storage.lmdb_store",
    "memstore.reshard",
    "memstore.replica",
    "memstore.service",
    "lmdb",
    "tqdm",
    "prometheus_client",
    "tokenizers",
    "safetensors",
]
PACKAGES = ("memstore", "client", "model")

_PROBE = """
import json, sys, time
{pre}
start = time.perf_counter()
import client
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "modules": sorted(sys.modules)}}))
"""


def import_cost(tree: Path, runs: int, torch_first: bool) -> dict:
    """Median seconds of `import client` in a fresh interpreter, and the modules the last run loaded."""
    code = _PROBE.format(pre="import torch" if torch_first else "")
    seconds = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=tree, env={"PYTHONPATH": str(tree)}, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise SystemExit(f"import client failed in {tree}:\n{out.stderr}")
        result = json.loads(out.stdout)
        seconds.append(result["seconds"])
    modules = result["modules"]
    own = [m for m in modules if m.split(".")[0] in PACKAGES]
    return {
        "seconds": statistics.median(seconds),
        "modules": len(modules),
        "project_modules": len(own),
        "server_side_loaded": [m for m in SERVER_SIDE if m in modules],
    }


def module_lines(tree: Path) -> dict[str, int]:
    """Lines per Python module of the packages (generated stubs left out)."""
    lines = {}
    for package in PACKAGES:
        for path in sorted((tree / package).rglob("*.py")):
            if "wire" in path.parts:
                continue
            lines[str(path.relative_to(tree))] = len(path.read_text().splitlines())
    return lines


def _measure(tree: Path, runs: int) -> dict:
    cold = import_cost(tree, runs, torch_first=False)
    warm = import_cost(tree, runs, torch_first=True)
    sizes = sorted(module_lines(tree).values())
    return {
        "import client (ms)": f"{cold['seconds'] * 1000:.0f}",
        "import client after torch (ms)": f"{warm['seconds'] * 1000:.0f}",
        "modules loaded": str(cold["modules"]),
        "project modules loaded": str(cold["project_modules"]),
        "server-side modules loaded": str(len(cold["server_side_loaded"])),
        "python modules": str(len(sizes)),
        "lines": str(sum(sizes)),
        "median lines per module": f"{statistics.median(sizes):.0f}",
        "largest module (lines)": str(sizes[-1]),
        "modules over 400 lines": str(sum(n > 400 for n in sizes)),
        "_loaded": ", ".join(cold["server_side_loaded"]) or "none",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", help="a source tree (repeat to compare; default: this)")
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per import measurement")
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.tree or [Path(__file__).resolve().parent.parent]]

    results = [_measure(tree, args.runs) for tree in trees]
    print(f"`import client`: median of {args.runs} fresh interpreters each")
    print("| | " + " | ".join(str(tree) for tree in trees) + " |")
    print("|---" * (len(trees) + 1) + "|")
    for key in results[0]:
        if not key.startswith("_"):
            print(f"| {key} | " + " | ".join(result[key] for result in results) + " |")
    for tree, result in zip(trees, results):
        print(f"server-side loaded by `import client` in {tree}: {result['_loaded']}")


if __name__ == "__main__":
    main()
