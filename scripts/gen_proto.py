"""Regenerate the Python gRPC stubs from proto/ (the only way they are ever changed).

python scripts/gen_proto.py              # writes memstore/wire/memstore_pb2*.py(i) and memstore/wire/etcd/*
python scripts/gen_proto.py --out DIR    # writes them under DIR instead (used by the drift test)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PROTO_FILES = [
    "memstore/wire/memstore.proto",
    # etcd 3.4's v3 API (vendored, options for Go stripped), spoken by memstore/etcd.py.
    "memstore/wire/etcd/kv.proto",
    "memstore/wire/etcd/auth.proto",
    "memstore/wire/etcd/rpc.proto",
]


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) on every .proto file, writing the stubs under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf well-known types
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO, help="root to write the stubs under (default: the repo)")
    generate(parser.parse_args(argv).out)


if __name__ == "__main__":
    main(sys.argv[1:])
