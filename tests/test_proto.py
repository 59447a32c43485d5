"""The committed gRPC stubs are exactly what scripts/gen_proto.py generates from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
STUBS = ["memstore_pb2.py", "memstore_pb2.pyi", "memstore_pb2_grpc.py"]


def _load_gen_proto() -> ModuleType:
    path = REPO / "scripts" / "gen_proto.py"
    spec = importlib.util.spec_from_file_location("gen_proto_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    _load_gen_proto().generate(out)
    return out / "memstore" / "wire"


@pytest.mark.parametrize("name", STUBS)
def test_committed_stub_matches_generated(generated: Path, name: str) -> None:
    committed = (REPO / "memstore" / "wire" / name).read_bytes()
    fresh = (generated / name).read_bytes()
    assert fresh == committed, (
        f"memstore/wire/{name} is out of date with proto/: run `python scripts/gen_proto.py` and commit the result"
    )


def test_generator_writes_only_the_stubs(generated: Path) -> None:
    assert sorted(p.name for p in generated.iterdir() if p.is_file()) == STUBS


def test_generator_reads_the_repository_protos() -> None:
    module = _load_gen_proto()
    assert module.PROTO_ROOT == REPO / "proto"
    for proto in module.PROTO_FILES:
        assert (module.PROTO_ROOT / proto).is_file()
