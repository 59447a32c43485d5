"""`memstore` command line: create, info, serve, snapshot, health, stats, export, import, verify, reshard.
Arguments are parsed and checked here, once (`serve` in cli_serve.py, the calls to a daemon in cli_remote.py)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from memstore.cli_args import enum_choice
from memstore.cli_remote import add_remote_parsers, run_health, run_snapshot, run_stats
from memstore.cli_serve import add_serve_parser, run_serve
from memstore.create import DEFAULT_CHUNK_ROWS, create_sharded, create_table
from memstore.dtypes import DType
from memstore.errors import InvalidArgumentError, MemstoreError, permission_message
from memstore.layout import EngramLayout
from memstore.logs import LogFormat, configure_logging
from memstore.offline import reading_offline
from memstore.reshard import reshard, table_dirs
from memstore.sharding import DEFAULT_PARTITIONS, partition_ranges
from memstore.space import disk_full_error, is_disk_full
from memstore.tabledir.checkpoint import table_version
from memstore.tabledir.fsafe import add_group_readable, file_policy
from memstore.tabledir.manifest import Backend, Init, Manifest, parse_dtype
from memstore.tabledir.names import CHECKPOINT_NAME
from memstore.tabledir.optimizer import OptimizerConfig, OptimizerKind


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
    parser.add_argument(
        "--log-format",
        **enum_choice(LogFormat),
        default=LogFormat.TEXT,
        help="json: one JSON object per log line (time, level, logger, message), for log collectors",
    )
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
    creatable = ", ".join(dtype.value for dtype in DType if not dtype.opaque)  # opaque rows are only imported
    create.add_argument("--dtype", type=_dtype, default="float16", help=f"one of {creatable} (default: float16)")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--init-std", type=float, default=1.0, help="std of the N(0, std^2) init (nn.Embedding: 1)")
    create.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows generated per write")
    create.add_argument("--overwrite", action="store_true", help="replace an existing table at PATH")
    add_group_readable(create)
    create.add_argument("--no-progress", action="store_true", help="no progress bar")
    create.add_argument(
        "--backend", **enum_choice(Backend), default=Backend.MMAP, help="mmap files or LMDB (default mmap)"
    )
    create.add_argument(
        "--lazy",
        action="store_true",
        help="write no rows: sparse files, never-written rows generated when read (tables larger than disk)",
    )
    create.add_argument(
        "--shards", type=int, default=1, help="split the table over N shard directories PATH/shard-K (default 1)"
    )
    create.add_argument(
        "--partitions",
        type=int,
        help=f"partitions spread over the shards (default {DEFAULT_PARTITIONS}); `memstore reshard` moves whole ones",
    )
    optimizer = OptimizerConfig()
    create.add_argument(
        "--optimizer",
        **enum_choice(OptimizerKind),
        help="server-side optimizer applied to pushed gradients (default: none, a frozen table)",
    )
    # Default None: given without the optimizer that reads it, a flag is an error, not ignored.
    create.add_argument("--lr", type=float, help=f"with --optimizer: its learning rate (default {optimizer.lr})")
    create.add_argument(
        "--betas",
        type=_float_pair,
        help=f"with --optimizer adam: its betas (default {','.join(map(str, optimizer.betas))})",
    )
    create.add_argument(
        "--eps", type=float, help=f"with --optimizer adagrad, rowwise_adagrad or adam (default {optimizer.eps})"
    )
    create.add_argument(
        "--initial-accumulator",
        type=float,
        help=f"with --optimizer adagrad or rowwise_adagrad (default {optimizer.initial_accumulator_value})",
    )

    info = commands.add_parser("info", help="print a table's layout, size and fingerprint")
    info.add_argument("path", type=Path)
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")

    add_serve_parser(commands)
    add_remote_parsers(commands)

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
    add_group_readable(imp)
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")

    verify = commands.add_parser(
        "verify",
        help="check every row and optimizer value against its checksum (and an untrained table's rows against the "
        "SHA-256 in its manifest); exit 0 intact, 2 damaged, 3 trained without checksums",
    )
    verify.add_argument("path", type=Path)
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")

    resh = commands.add_parser(
        "reshard", help="copy a table, offline, onto another number of shards (checked by a checksum of all rows)"
    )
    resh.add_argument("source", type=Path, help="a table directory, or a sharded one (shard-0 ...)")
    resh.add_argument("dest", type=Path, help="where the new table is written; must not exist")
    resh.add_argument("--shards", type=int, required=True, help="shards of the new table (1: a plain table)")
    resh.add_argument(
        "--partitions", type=int, help=f"partitions of the new table (default: the source's; {DEFAULT_PARTITIONS})"
    )
    resh.add_argument("--no-progress", action="store_true", help="no progress bar")

    reseed = commands.add_parser(
        "reseed",
        help="replace a (stopped) replica's table with a consistent copy streamed from its primary "
        "(docs/replication.md); the old table stays whole until the new one arrived and was checked",
    )
    reseed.add_argument("path", type=Path, help="the table directory to replace (or create); no daemon may serve it")
    reseed.add_argument("--from", dest="primary", required=True, metavar="ADDRESS", help="the primary's host:port")
    reseed.add_argument("--tls-ca", type=Path, help="connect with TLS, trusting this CA (PEM)")
    reseed.add_argument(
        "--token-file", type=Path, help="a file holding the token to show the primary (a `replicate TOKEN`)"
    )
    reseed.add_argument(
        "--any-table",
        action="store_true",
        help="replace PATH even when it holds another table than the primary's (by default that is refused)",
    )
    add_group_readable(reseed)
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
    if manifest.sharding is not None:  # the bytes above are this shard's; the rows, the table's
        lines.append(describe_shard(manifest))
    return "\n".join(lines)


def describe_shard(manifest: Manifest) -> str:
    """One line on a shard's manifest: which shard, its partitions, the rows it stores of each layer."""
    sharding = manifest.sharding
    assert sharding is not None
    layers = manifest.layout.layer_ids
    stored = ", ".join(f"{manifest.stored_rows(layer):,} stored rows of layer {layer}" for layer in layers)
    return (
        f"shard {sharding.shard} of {sharding.num_shards}, partitions {partition_ranges(sharding.partitions)} "
        f"of {sharding.num_partitions}, {stored}"
    )


def _create(args: argparse.Namespace) -> None:
    layout = EngramLayout(
        layer_ids=args.layers,
        vocab_size_per_ngram=args.vocab_size_per_ngram,
        max_ngram=args.max_ngram,
        heads_per_ngram=args.heads_per_ngram,
        dim=args.dim,
    )
    optimizer = _optimizer(args)
    manifest = Manifest(
        layout=layout,
        dtype=args.dtype,
        seed=args.seed,
        init_std=args.init_std,
        optimizer=optimizer,
        init=Init.LAZY if args.lazy else Init.EAGER,
        backend=args.backend,
    )
    if args.shards < 1:
        raise InvalidArgumentError(f"--shards is {args.shards}; it must be at least 1")
    if args.partitions is not None and args.shards == 1:
        raise InvalidArgumentError("--partitions splits a table over shards; give --shards N (N > 1) with it")
    partitions = DEFAULT_PARTITIONS if args.partitions is None else args.partitions
    with tqdm(total=layout.total_rows, unit="row", unit_scale=True, disable=args.no_progress, desc="create") as bar:
        if args.shards == 1:
            create_table(args.path, manifest, chunk_rows=args.chunk_rows, overwrite=args.overwrite, progress=bar.update)
            shards = []
        else:
            shards = create_sharded(
                args.path, manifest, args.shards, partitions, args.chunk_rows, args.overwrite, progress=bar.update
            )
    if not shards:
        print(f"created {args.path}\n{describe_table(manifest)}")
        return
    print(f"created {args.path}: {args.shards} shards of {partitions} partitions\n{describe_table(manifest)}")
    for shard in shards:
        print(f"{shard}: {describe_shard(Manifest.read(shard))}")


# The optimizer flags, and the kinds that read each (any other kind would ignore it).
_OPTIMIZER_FLAGS = {
    "lr": ("--lr", tuple(OptimizerKind)),
    "betas": ("--betas", (OptimizerKind.ADAM,)),
    "eps": ("--eps", (OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD, OptimizerKind.ADAM)),
    "initial_accumulator": ("--initial-accumulator", (OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD)),
}


def _optimizer(args: argparse.Namespace) -> OptimizerConfig | None:
    """The optimizer the flags ask for (None: a frozen table); InvalidArgumentError for a flag that
    the chosen optimizer (or none) would ignore."""
    given = [name for name in _OPTIMIZER_FLAGS if getattr(args, name) is not None]
    if args.optimizer is None:
        if given:
            flags = ", ".join(_OPTIMIZER_FLAGS[name][0] for name in given)
            raise InvalidArgumentError(
                f"{flags} set an optimizer's hyperparameters, but no --optimizer is given: the table would be "
                "frozen and take no pushes; add --optimizer sgd|adagrad|rowwise_adagrad|adam, or drop them"
            )
        return None
    for name in given:
        flag, kinds = _OPTIMIZER_FLAGS[name]
        if args.optimizer not in kinds:
            raise InvalidArgumentError(
                f"{flag} does not apply to --optimizer {args.optimizer.value} (only to "
                f"{', '.join(kind.value for kind in kinds)}); drop it"
            )
    defaults = OptimizerConfig()
    return OptimizerConfig(
        kind=args.optimizer,
        lr=defaults.lr if args.lr is None else args.lr,
        betas=defaults.betas if args.betas is None else args.betas,
        eps=defaults.eps if args.eps is None else args.eps,
        initial_accumulator_value=(
            defaults.initial_accumulator_value if args.initial_accumulator is None else args.initial_accumulator
        ),
    )


def _info(args: argparse.Namespace) -> None:
    """`memstore info`: one table directory, or every shard of a sharded table."""
    dirs = table_dirs(args.path)
    manifests = [Manifest.read(d) for d in dirs]
    if dirs == [args.path]:  # a plain table, or one shard given directly
        if args.json:
            print(manifests[0].to_json(), end="")
            return
        print(describe_table(manifests[0]))
        _print_disk(args.path, manifests[0])
        return
    if args.json:  # one manifest per shard, in shard order
        print(json.dumps([json.loads(m.to_json()) for m in manifests], indent=2))
        return
    whole = replace(manifests[0], sharding=None)
    print(f"sharded table: {len(dirs)} shards of {manifests[0].sharding.num_partitions} partitions")
    print(describe_table(whole))
    for path, manifest in zip(dirs, manifests, strict=True):
        print(f"{path.name}: {describe_shard(manifest)}")
        _print_disk(path, manifest)


def _print_disk(path: Path, manifest: Manifest) -> None:
    """What one table directory occupies on disk, and its checkpoint."""
    on_disk = sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())
    params = sum(manifest.stored_rows(layer) for layer in manifest.layout.layer_ids) * manifest.layout.dim
    print(
        f"materialised: {on_disk:,} bytes on disk for {params:,} logical parameters "
        f"({on_disk / max(1, manifest.total_bytes):.2%} of the rows' {manifest.total_bytes:,} bytes)"
    )
    checkpoint = path / CHECKPOINT_NAME
    if checkpoint.exists():
        print(f"checkpoint: {checkpoint.read_text().strip()}")
    if manifest.optimizer is not None:  # who holds it, and whether its files hold every acknowledged push
        from memstore.offline import table_state

        try:
            lines = table_state(path).lines()
        except MemstoreError as exc:  # info is how an operator looks at a damaged table: say it, go on
            lines = [f"DAMAGED: {exc}"]
        for line in lines:
            print(line)


def _verify(args: argparse.Namespace) -> int:
    """`memstore verify`: every table directory (all shards of a sharded table); 0 when intact, 2 when damaged,
    3 when a trained table has no row checksums to verify against."""
    from memstore.integrity import verify_table

    dirs = table_dirs(args.path)
    manifests = [Manifest.read(d) for d in dirs]  # also checks each manifest against its own checksums
    worst = 0
    for path, manifest in zip(dirs, manifests, strict=True):
        # No daemon may push while the rows are checked (a push in flight would read as damage), nor may the
        # files lack pushes their log holds: UnavailableError / TableFormatError say what to do.
        with reading_offline(path, "verify"):
            trained = table_version(path)
            damage = verify_table(path, manifest)
        if damage is None:  # no checksums (an older memstore, or reshard): the create digest is all there is
            worst = max(worst, _verify_digest(path, manifest, trained, False, args.no_progress))
        elif damage:
            worst = 2
            for found in damage:
                print(f"{path}: damaged: {found.describe()} do not match their checksums", file=sys.stderr)
            if not trained:  # the create digest too, as verify always reported it
                _verify_digest(path, manifest, trained, True, args.no_progress)
        elif trained:
            print(
                f"{path}: intact: trained ({trained} pushes since create, import or reshard), every row and optimizer "
                "value matches the checksum its last write recorded"
            )
        else:
            worst = max(worst, _verify_digest(path, manifest, trained, True, args.no_progress))
    return worst


def _verify_digest(path: Path, manifest: Manifest, trained: int, summed: bool, quiet: bool) -> int:
    """The rows against the sha256 recorded at create: 0 as recorded, 2 damaged, 3 nothing to compare with
    (trained, or lazy, and no checksums). `summed`: every row matched its checksum already."""
    from memstore.exchange import rows_digest

    if trained:
        print(
            f"{path}: cannot verify: trained ({trained} pushes) and it has no row checksums (made by an older "
            "memstore); open it writable once (memstore serve) to build them",
            file=sys.stderr,
        )
        return 3
    if manifest.rows_sha256 is None:
        if summed:
            print(f"{path}: intact: every row matches its checksum (a lazy table records no sha256)")
            return 0
        print(f"{path}: cannot verify: a lazy table without row checksums (made by an older memstore)", file=sys.stderr)
        return 3
    total = sum(manifest.stored_rows(layer) for layer in manifest.layout.layer_ids)
    with tqdm(total=total, unit="row", unit_scale=True, disable=quiet, desc="verify") as bar:
        actual = rows_digest(path, progress=bar.update)
    if actual == manifest.rows_sha256:
        print(f"{path}: rows sha256 {actual} as recorded")
        return 0
    print(f"{path}: rows sha256 {actual}, recorded {manifest.rows_sha256}: the rows are damaged", file=sys.stderr)
    return 2


def _reshard(args: argparse.Namespace) -> None:
    """`memstore reshard`: copy, verify, print where the rows went and the checksum both sides agree on."""
    source_dirs = table_dirs(args.source)
    total = 3 * Manifest.read(source_dirs[0]).layout.total_rows  # checksum, copy, read-back: see reshard()
    with tqdm(total=total, unit="row", unit_scale=True, disable=args.no_progress, desc="reshard") as bar:
        report = reshard(args.source, args.dest, args.shards, args.partitions, progress=bar.update)
    into = "one plain table" if args.shards == 1 else f"{args.shards} shards of {report.num_partitions} partitions"
    print(
        f"resharded {args.source} ({report.source_shards} shard{'s' if report.source_shards > 1 else ''}) into "
        f"{args.dest} ({into}): {report.rows_moved:,} rows in {report.elapsed_s:.1f} s"
    )
    if args.shards > 1:
        for shard in table_dirs(args.dest):
            print(f"{shard}: {describe_shard(Manifest.read(shard))}")
    print(f"checksum of all rows: {report.dest_checksum.rows} (source and destination agree)")
    if report.dest_checksum.state is not None:
        print(f"checksum of the optimizer state: {report.dest_checksum.state} (source and destination agree)")
    if report.layer_steps:
        steps = ", ".join(f"layer {layer} at step {step}" for layer, step in report.layer_steps.items())
        print(f"optimizer steps carried over: {steps}; version 0, no log (re-seed any followers from these shards)")


def _reseed(args: argparse.Namespace) -> None:
    from memstore.auth import ClientTls, read_token
    from memstore.reseed import reseed_from

    tls = None if args.tls_ca is None else ClientTls(args.tls_ca)
    token = read_token(args.token_file)  # None: $MEMSTORE_TOKEN, if set
    result = reseed_from(args.primary, args.path, tls=tls, token=token, allow_other_table=args.any_table)
    print(
        f"re-seeded {args.path} from {args.primary}: version {result.version}, {result.files} files, "
        f"{result.data_bytes / 1e6:.1f} MB received ({result.total_bytes / 1e6:.1f} MB with holes) in "
        f"{result.seconds:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memstore` console script."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_format)
    with file_policy(getattr(args, "group_readable", False)):  # private files (0600/0700) unless asked
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "create":
            _create(args)
        elif args.command == "info":
            _info(args)
        elif args.command == "serve":
            return run_serve(args)
        elif args.command == "snapshot":
            return run_snapshot(args)
        elif args.command == "health":
            return run_health(args)
        elif args.command == "stats":
            return run_stats(args)
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
        elif args.command == "reshard":
            _reshard(args)
        elif args.command == "reseed":
            _reseed(args)
    except MemstoreError as exc:
        print(f"memstore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # a table file this user may not read or write: say which, not a traceback
        print(f"memstore {args.command}: error: {permission_message(Path(exc.filename or '.'))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        where = Path(exc.filename or (getattr(args, "path", None) or "."))
        print(f"memstore {args.command}: error: {disk_full_error(where, args.command, exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
