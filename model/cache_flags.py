"""The device cache's command-line flags, shared by `model.train` and `model.generate`, parsed once into a
`client.cache.CacheConfig` (or None: no cache, exactly the prefetcher that ran before).

    --cache-rows N          rows per layer held on the model's device
    --cache-bytes SIZE      or bytes of stored rows per layer (64MiB, 1.5GiB; both given: the smaller bound)
    --cache-policy P        lru (default), lfu or tinylfu
    --cache-max-lag K       a trainable table: no cached row served more than K versions (pushes) behind
                            the newest the client knows of (default 0; docs/cache.md)

The cache sits in the prefetcher, in front of a memstore table: it needs `--source memstore` and
prefetching. Over a trainable table it follows the daemon's pushes (client.coherence), which needs one
daemon (`--memstore`): a cluster's trainable table is refused with a message saying so.
"""

from __future__ import annotations

import argparse

from client.cache import CacheConfig, CachePolicy
from memstore.cli_args import enum_choice, parse_bytes
from memstore.errors import InvalidArgumentError

CACHE_FLAGS = ("--cache-rows", "--cache-bytes", "--cache-policy", "--cache-max-lag")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The device cache's flags (parsed by cache_config_from_args)."""
    group = parser.add_argument_group("device cache (rows kept on the model's device, in front of the memstore)")
    group.add_argument("--cache-rows", type=int, metavar="N", help="cache up to N rows per Engram layer")
    group.add_argument(
        "--cache-bytes", type=parse_bytes, metavar="SIZE", help="cache up to SIZE of stored rows per layer (64MiB)"
    )
    group.add_argument(
        "--cache-policy",
        **enum_choice(CachePolicy),
        help="admission and eviction: lru (default), lfu, or tinylfu (a frequency sketch decides admission)",
    )
    group.add_argument(
        "--cache-max-lag",
        type=int,
        metavar="K",
        help="a trainable table: no cached row served more than K versions behind the newest known (default 0)",
    )


def cache_config_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser, *, generation_only: bool = False
) -> CacheConfig | None:
    """The CacheConfig the flags name, or None when neither --cache-rows nor --cache-bytes is given.
    Every contradiction or bad value is a usage error naming the flag."""
    if args.cache_rows is None and args.cache_bytes is None:
        extra = [flag for flag in CACHE_FLAGS[2:] if _given(args, flag)]
        if extra:
            parser.error(f"{' and '.join(extra)} set up the device cache: give its size (--cache-rows/--cache-bytes)")
        return None
    policy = args.cache_policy or CachePolicy.LRU
    if policy is CachePolicy.STATIC:
        parser.error(
            "--cache-policy static needs its hot set given up front (CacheConfig.hot_rows, in Python); "
            "on the command line choose lru, lfu or tinylfu"
        )
    if args.cache_max_lag is not None and args.cache_max_lag < 0:
        parser.error(f"--cache-max-lag must be at least 0; got {args.cache_max_lag}")
    lag = {} if args.cache_max_lag is None else {"cache_max_lag": args.cache_max_lag}
    try:
        return CacheConfig(
            policy=policy,
            max_rows=args.cache_rows,
            max_bytes=args.cache_bytes,
            generation_only=generation_only,
            **lag,
        )
    except InvalidArgumentError as exc:
        message = str(exc)
        for field, flag in (("max_rows", "--cache-rows"), ("max_bytes", "--cache-bytes")):
            message = message.replace(f"CacheConfig.{field}", flag)
        parser.error(message)


def check_cache_usable(
    args: argparse.Namespace, parser: argparse.ArgumentParser, memstore: bool, prefetch: bool
) -> None:
    """The cache lives in the prefetcher, in front of a memstore table: refuse it anywhere else."""
    given = [flag for flag in CACHE_FLAGS if _given(args, flag)]
    if not given:
        return
    if not memstore:
        parser.error(f"{given[0]}: the device cache sits in front of a memstore table; use --source memstore")
    if not prefetch:
        parser.error(f"{given[0]}: the device cache lives in the prefetcher; drop --no-prefetch")


def _given(args: argparse.Namespace, flag: str) -> bool:
    return getattr(args, flag[2:].replace("-", "_")) is not None
