"""`checkpoint.json`: the version and per-layer optimizer steps a table's files hold at least.

A checkpoint is written after the row and state files are msynced; recovery replays the log records
above its version. It also keeps each client's last acknowledged push per layer, so that a push a
client retries after a restart is recognised and not applied twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from memstore.errors import TableFormatError
from memstore.tabledir.fsafe import write_durably
from memstore.tabledir.names import CHECKPOINT_NAME


@dataclass
class PushResult:
    """What an acknowledged push did."""

    version: int
    layer_step: int
    rows: int


@dataclass
class Checkpoint:
    """What the files hold at least: the version, each layer's optimizer steps, and each client's
    last step per layer (so a retried push is recognised across restarts too)."""

    version: int = 0
    layer_steps: dict[int, int] = field(default_factory=dict)
    last_push: dict[tuple[str, int], tuple[int, PushResult]] = field(default_factory=dict)

    @classmethod
    def read(cls, table_dir: Path) -> Checkpoint:
        path = table_dir / CHECKPOINT_NAME
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            last_push = {
                (client, int(layer)): (int(step), PushResult(int(version), int(layer_step), int(rows)))
                for client, layer, step, version, layer_step, rows in data.get("last_push", [])
            }
            layer_steps = {int(k): int(v) for k, v in data["layer_steps"].items()}
            return cls(int(data["version"]), layer_steps, last_push)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # AttributeError: not a JSON object
            raise TableFormatError(f"{path} is malformed ({exc!r}); restore the table from a snapshot") from None

    def write(self, table_dir: Path) -> None:
        """Write checkpoint.json durably (a full disk leaves the previous one, and no temp file)."""
        data = {
            "version": self.version,
            "layer_steps": {str(k): v for k, v in sorted(self.layer_steps.items())},
            "last_push": [
                [client, layer, step, ack.version, ack.layer_step, ack.rows]
                for (client, layer), (step, ack) in sorted(self.last_push.items())
            ],
        }
        write_durably(table_dir / CHECKPOINT_NAME, json.dumps(data).encode())


def table_version(table_dir: Path) -> int:
    """Pushes applied to a table, as its checkpoint records them (0 for a table never trained)."""
    return Checkpoint.read(Path(table_dir)).version
