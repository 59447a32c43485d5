"""`memstore` command line: create, info, serve, snapshot, export, import. Arguments are parsed and checked
here, once."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from memstore.create import DEFAULT_CHUNK_ROWS, create_table
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, MemstoreError
from memstore.layout import EngramLayout
from memstore.live import CHECKPOINT_NAME, LiveConfig, table_version
from memstore.manifest import Backend, Init, Manifest, parse_dtype
from memstore.optim import OptimizerConfig, OptimizerKind
from memstore.service import ServerConfig, serve
from memstore.wal import Durability


def _dtype(text: str) -> DType:
    try:
        return parse_dtype(text)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4; got {text!r}") from None


def _float_pair(text: str) -> tuple[float, float]:
    try:
        first, second = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.9,0.999; got {text!r}") from None
    return first, second


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memstore", description="Engram memstore: create, inspect and serve tables.")
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", help="create a table with deterministic initial rows")
    create.add_argument("path", type=Path)
    create.add_argument("--layers", type=_int_list, required=True, help="Engram layer ids, e.g. 1,4")
    create.add_argument(
        "--vocab-size-per-ngram", type=_int_list, required=True, help="per order 2..N, e.g. 50000,50000"
    )
    create.add_argument("--max-ngram", type=int, default=3)
    create.add_argument("--heads-per-ngram", type=int, default=8)
    create.add_argument("--dim", type=int, required=True, help="values per row (n_embed_per_ngram / heads)")
    create.add_argument("--dtype", type=_dtype, default="float16", help="float32, float16 or bfloat16")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--init-std", type=float, default=1.0, help="std of the N(0, std^2) init (nn.Embedding: 1)")
    create.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows generated per write")
    create.add_argument("--overwrite", action="store_true", help="replace an existing table at PATH")
    create.add_argument("--no-progress", action="store_true", help="no progress bar")
    create.add_argument(
        "--backend", type=Backend, choices=list(Backend), default=Backend.MMAP, help="mmap files or LMDB"
    )
    create.add_argument(
        "--lazy",
        action="store_true",
        help="write no rows: sparse files, never-written rows generated when read (tables larger than disk)",
    )
    optimizer = OptimizerConfig()
    create.add_argument(
        "--optimizer",
        type=OptimizerKind,
        choices=list(OptimizerKind),
        help="server-side optimizer applied to pushed gradients (default: none, a frozen table)",
    )
    create.add_argument("--lr", type=float, default=optimizer.lr, help="the optimizer's learning rate")
    create.add_argument("--betas", type=_float_pair, default=optimizer.betas, help="adam's betas, e.g. 0.9,0.999")
    create.add_argument("--eps", type=float, default=optimizer.eps)
    create.add_argument(
        "--initial-accumulator", type=float, default=optimizer.initial_accumulator_value, help="adagrad kinds"
    )

    info = commands.add_parser("info", help="print a table's layout, size and fingerprint")
    info.add_argument("path", type=Path)
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")

    defaults = ServerConfig()
    srv = commands.add_parser("serve", help="serve a table over gRPC until SIGTERM/Ctrl-C")
    srv.add_argument("path", type=Path)
    srv.add_argument("--listen", default="127.0.0.1:50051", help="host:port; port 0 picks a free one")
    srv.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    srv.add_argument("--max-rows-per-request", type=int, default=defaults.max_rows_per_request)
    srv.add_argument("--chunk-bytes", type=int, default=defaults.chunk_bytes, help="row bytes per streamed message")
    srv.add_argument("--max-workers", type=int, default=defaults.max_workers, help="concurrent calls served")
    srv.add_argument("--grace", type=float, default=defaults.grace_s, help="seconds to drain calls on SIGTERM")
    srv.add_argument(
        "--log-interval", type=float, default=defaults.log_interval_s, help="seconds between traffic lines"
    )
    srv.add_argument(
        "--no-same-host", action="store_true", help="do not let clients on this host map the table's files"
    )
    srv.add_argument("--read-only", action="store_true", help="refuse pushes (e.g. a snapshot serving inference)")
    live = LiveConfig()
    srv.add_argument(
        "--durability",
        type=Durability,
        choices=list(Durability),
        default=live.durability,
        help="fsync: a push is acknowledged once its log record is on disk (survives power loss); "
        "os: once the OS has it (survives the daemon's crash, not the host's)",
    )
    srv.add_argument("--checkpoint-every", type=int, default=live.checkpoint_every, help="pushes between checkpoints")
    srv.add_argument("--snapshot-dir", type=Path, help="where Snapshot writes (default: PATH.snapshots)")

    snap = commands.add_parser("snapshot", help="ask a serving daemon for a consistent snapshot")
    snap.add_argument("address", help="the daemon's HOST:PORT")
    snap.add_argument("name", help="directory name inside the daemon's snapshot directory")

    export = commands.add_parser("export", help="write a table's rows to a safetensors file")
    export.add_argument("path", type=Path)
    export.add_argument("dest", type=Path)
    export.add_argument("--dtype", type=_dtype, help="convert the rows (default: the table's dtype)")

    imp = commands.add_parser("import", help="create a table from a safetensors file (rows per layer)")
    imp.add_argument("src", type=Path)
    imp.add_argument("path", type=Path)
    imp.add_argument(
        "--manifest",
        type=Path,
        help="a manifest.json for a file made elsewhere (layout, e.g. with explicit_head_sizes, and dtype); "
        "default: the one `memstore export` stores in the file",
    )
    imp.add_argument("--overwrite", action="store_true", help="replace an existing table at PATH")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")

    verify = commands.add_parser("verify", help="check a table's rows against the SHA-256 in its manifest")
    verify.add_argument("path", type=Path)
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def describe_table(manifest: Manifest) -> str:
    """Human-readable summary of a table: layout, rows, parameters, bytes, fingerprint."""
    layout = manifest.layout
    lines = [
        f"format version {manifest.format_version}, backend {manifest.backend.value}, dtype {manifest.dtype.value}, "
        f"{manifest.init.value} init",
        f"layout: layers {list(layout.layer_ids)}, orders 2..{layout.max_ngram}, "
        f"{layout.heads_per_ngram} heads per order, dim {layout.dim}, "
        f"seed {manifest.seed}, init std {manifest.init_std}",
    ]
    for layer_id in layout.layer_ids:
        per_order = ", ".join(
            f"{order}-gram {heads[0]}..{heads[-1]}" for order, heads in enumerate(layout.primes(layer_id), start=2)
        )
        lines.append(f"  layer {layer_id}: {layout.num_rows(layer_id):,} rows (head primes {per_order})")
    lines += [
        f"rows: {layout.total_rows:,}   parameters: {layout.num_params:,}   bytes: {manifest.total_bytes:,} "
        f"({manifest.total_bytes / 2**30:.2f} GiB)",
        f"fingerprint: {manifest.fingerprint}",
    ]
    if manifest.optimizer is None:
        lines.append("optimizer: none (frozen: lookups only)")
    else:
        settings = ", ".join(f"{k} {v}" for k, v in manifest.optimizer.to_dict().items() if k != "kind")
        lines.append(f"optimizer: {manifest.optimizer.kind.value} ({settings})")
    return "\n".join(lines)


def _create(args: argparse.Namespace) -> None:
    layout = EngramLayout(
        layer_ids=args.layers,
        vocab_size_per_ngram=args.vocab_size_per_ngram,
        max_ngram=args.max_ngram,
        heads_per_ngram=args.heads_per_ngram,
        dim=args.dim,
    )
    optimizer = None
    if args.optimizer is not None:
        optimizer = OptimizerConfig(
            kind=args.optimizer,
            lr=args.lr,
            betas=args.betas,
            eps=args.eps,
            initial_accumulator_value=args.initial_accumulator,
        )
    manifest = Manifest(
        layout=layout,
        dtype=args.dtype,
        seed=args.seed,
        init_std=args.init_std,
        optimizer=optimizer,
        init=Init.LAZY if args.lazy else Init.EAGER,
        backend=args.backend,
    )
    with tqdm(total=layout.total_rows, unit="row", unit_scale=True, disable=args.no_progress, desc="create") as bar:
        create_table(args.path, manifest, chunk_rows=args.chunk_rows, overwrite=args.overwrite, progress=bar.update)
    print(f"created {args.path}\n{describe_table(manifest)}")


def _verify(args: argparse.Namespace) -> int:
    from memstore.exchange import rows_digest

    manifest = Manifest.read(args.path)
    if manifest.rows_sha256 is None:
        raise InvalidArgumentError(f"{args.path} records no rows sha256 (a lazy table): nothing to verify against")
    total = manifest.layout.total_rows
    with tqdm(total=total, unit="row", unit_scale=True, disable=args.no_progress, desc="verify") as bar:
        actual = rows_digest(args.path, progress=bar.update)
    if actual == manifest.rows_sha256:
        print(f"{args.path}: rows sha256 {actual} as recorded")
        return 0
    trained = table_version(args.path)
    why = f"expected once trained ({trained} pushes since create or import)" if trained else "the rows are damaged"
    print(f"{args.path}: rows sha256 {actual}, recorded {manifest.rows_sha256}: {why}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memstore` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "create":
            _create(args)
        elif args.command == "info":
            manifest = Manifest.read(args.path)
            if args.json:
                print(manifest.to_json(), end="")
            else:
                print(describe_table(manifest))
                on_disk = sum(f.stat().st_blocks * 512 for f in args.path.rglob("*") if f.is_file())
                print(
                    f"materialised: {on_disk:,} bytes on disk for {manifest.layout.num_params:,} logical parameters "
                    f"({on_disk / max(1, manifest.total_bytes):.2%} of the rows' {manifest.total_bytes:,} bytes)"
                )
                checkpoint = args.path / CHECKPOINT_NAME
                if checkpoint.exists():
                    print(f"checkpoint: {checkpoint.read_text().strip()}")
        elif args.command == "serve":
            config = ServerConfig(
                max_rows_per_request=args.max_rows_per_request,
                chunk_bytes=args.chunk_bytes,
                max_workers=args.max_workers,
                grace_s=args.grace,
                log_interval_s=args.log_interval,
                same_host=not args.no_same_host,
                snapshot_dir=args.snapshot_dir,
            )
            live = LiveConfig(durability=args.durability, checkpoint_every=args.checkpoint_every)
            return serve(args.path, args.listen, config, args.port_file, read_only=args.read_only, live_config=live)
        elif args.command == "snapshot":
            from client import MemstoreClient

            with MemstoreClient(args.address) as client:
                path, version = client.snapshot(args.name)
            print(f"snapshot of version {version} at {path}")
        elif args.command == "export":
            from memstore.exchange import export_safetensors

            export_safetensors(args.path, args.dest, args.dtype)
            print(f"exported {args.path} to {args.dest}")
        elif args.command == "import":
            from memstore.exchange import import_safetensors

            manifest = Manifest.from_json(args.manifest.read_text()) if args.manifest else None
            total = manifest.layout.total_rows if manifest else None
            with tqdm(total=total, unit="row", unit_scale=True, disable=args.no_progress, desc="import") as bar:
                import_safetensors(args.src, args.path, manifest, overwrite=args.overwrite, progress=bar.update)
            imported = Manifest.read(args.path)
            print(
                f"imported {args.src} as {args.path}\n{describe_table(imported)}\nrows sha256: {imported.rows_sha256}"
            )
        elif args.command == "verify":
            return _verify(args)
    except MemstoreError as exc:
        print(f"memstore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
