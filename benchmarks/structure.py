"""What importing the client costs, and how large the modules are, for source trees side by side.

    python -m benchmarks.structure                                 # this checkout
    python -m benchmarks.structure --tree /tmp/old --tree .        # an older checkout beside this one
                                                                   # (git worktree add /tmp/old REV)

For `import client` it starts a fresh interpreter per run (the tree first on sys.path) and reports
the median wall time of the import, the modules it leaves in sys.modules (all, and the project's own),
and which server-side modules and heavy dependencies it loaded (the modules the tree's light-client
import contract in pyproject.toml forbids, and the model's tokenizers and safetensors). Torch dominates the time: a
training or inference process has paid for it already, so the time without torch is reported too
(torch imported before the clock starts). For the sources it reports lines per module.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

# Dependencies only the model and the tests need (besides what the client's layering contract forbids).
_MODEL_ONLY = ["tokenizers", "safetensors"]
PACKAGES = ("memstore", "client", "model")

_PROBE = """
import json, sys, time
{pre}
start = time.perf_counter()
import client
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "modules": sorted(sys.modules)}}))
"""


def server_side(tree: Path) -> list[str]:
    """What `import client` must not load: the modules the tree's light-client import contract forbids
    (pyproject.toml; the daemon's engine, LMDB, tqdm, prometheus-client), and the model's dependencies."""
    config = tomllib.loads((tree / "pyproject.toml").read_text())
    contracts = config.get("tool", {}).get("importlinter", {}).get("contracts", [])
    forbidden = [m for c in contracts if c.get("source_modules") == ["client"] for m in c["forbidden_modules"]]
    # A tree without the contract (one from before it): the same list as this one's.
    return (forbidden or server_side(Path(__file__).resolve().parent.parent)[: -len(_MODEL_ONLY)]) + _MODEL_ONLY


def import_costs(trees: list[Path], runs: int, torch_first: bool) -> list[dict]:
    """Per tree: the median seconds of `import client` in a fresh interpreter (the trees' runs
    interleaved, so that load from elsewhere on the machine falls on all alike), and what it loaded."""
    code = _PROBE.format(pre="import torch" if torch_first else "")
    seconds: dict[Path, list[float]] = {tree: [] for tree in trees}
    modules: dict[Path, list[str]] = {}
    for _ in range(runs):
        for tree in trees:
            out = subprocess.run(
                [sys.executable, "-c", code], cwd=tree, env={"PYTHONPATH": str(tree)}, capture_output=True, text=True
            )
            if out.returncode != 0:
                raise SystemExit(f"import client failed in {tree}:\n{out.stderr}")
            result = json.loads(out.stdout)
            seconds[tree].append(result["seconds"])
            modules[tree] = result["modules"]
    costs = []
    for tree in trees:
        own = [m for m in modules[tree] if m.split(".")[0] in PACKAGES]
        costs.append(
            {
                "seconds": statistics.median(seconds[tree]),
                "modules": len(modules[tree]),
                "project_modules": len(own),
                "server_side_loaded": [m for m in server_side(tree) if m in modules[tree]],
            }
        )
    return costs


def module_lines(tree: Path) -> dict[str, int]:
    """Lines per Python module of the packages (generated stubs left out)."""
    lines = {}
    for package in PACKAGES:
        for path in sorted((tree / package).rglob("*.py")):
            if "wire" in path.parts:
                continue
            lines[str(path.relative_to(tree))] = len(path.read_text().splitlines())
    return lines


def _rows(tree: Path, cold: dict, warm: dict) -> dict[str, str]:
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

    cold = import_costs(trees, args.runs, torch_first=False)
    warm = import_costs(trees, args.runs, torch_first=True)
    results = [_rows(tree, c, w) for tree, c, w in zip(trees, cold, warm)]
    print(f"`import client`: median of {args.runs} fresh interpreters each, the trees interleaved")
    print("| | " + " | ".join(str(tree) for tree in trees) + " |")
    print("|---" * (len(trees) + 1) + "|")
    for key in results[0]:
        if not key.startswith("_"):
            print(f"| {key} | " + " | ".join(result[key] for result in results) + " |")
    for tree, result in zip(trees, results):
        print(f"server-side loaded by `import client` in {tree}: {result['_loaded']}")


if __name__ == "__main__":
    main()
