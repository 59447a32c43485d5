"""Staging: how a whole table directory (a create, an import, a reshard, a snapshot) appears at its path.

A new table is built in a hidden directory beside its target (`staging_dir`, named by
`names.staging_name`), its files fsynced, and only then renamed into place (`replace_table_dir`,
`publish_dir`): an interrupted build leaves no half table that looks valid, only a hidden
directory that the next build of the same target by the same pid removes (`staged` removes it
on failure). A rename never replaces what appeared at the target meanwhile, unless asked to
overwrite, and then only a memstore table that no process holds (memstore.tabledir.lock): it is
swapped atomically where the system can (renameat2 RENAME_EXCHANGE) and deleted after the swap.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from memstore.errors import InvalidArgumentError, MemstoreError
from memstore.tabledir.fsafe import fsync_dir, make_dir, restrict_tree
from memstore.tabledir.lock import lock_table
from memstore.tabledir.manifest import Manifest
from memstore.tabledir.names import MANIFEST_NAME, shard_dirs, staging_name


def staging_dir(target: Path, purpose: str) -> Path:
    """A fresh hidden directory beside `target` where a new table is built before it is renamed into place."""
    if not target.parent.is_dir():  # a new snapshots directory, say: private like the tables it will hold
        make_dir(target.parent, parents=True)
    tmp = target.parent / staging_name(target.name, purpose)
    shutil.rmtree(tmp, ignore_errors=True)
    make_dir(tmp)  # private (0700) whatever the umask: it becomes the table directory
    return tmp


@contextmanager
def staged(target: Path, purpose: str) -> Iterator[Path]:
    """`staging_dir` for the `with` block, removed with everything in it if the block fails (the block
    ends by moving it into place: `replace_table_dir` or `publish_dir`)."""
    tmp = staging_dir(target, purpose)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, where nothing may be (InvalidArgumentError if
    something appeared there meanwhile: it is never replaced), private and durably."""
    restrict_tree(new)  # private (0700/0600) whatever the umask the stores' files were created with
    rename_noreplace(new, target)
    fsync_dir(target.parent)


def replace_table_dir(new: Path, target: Path, overwrite: bool = False) -> None:
    """Move `new` to `target`; an existing table is moved aside first, never rewritten in place, and
    removed only after the new table is in place. Refused (UnavailableError, nothing moved) while a
    daemon or reader holds the existing table: it is held exclusively from the check to the move.

    What is at `target` is checked again here, at the move, not only when the caller began (a copy
    takes minutes): without `overwrite` anything that appeared there since is refused (the rename
    never replaces), with it only a memstore table is replaced."""
    old = None
    with _held_for_replacement(target):
        if not overwrite or not os.path.lexists(target):
            publish_dir(new, target)
            return
        restrict_tree(new)
        check_table_root(target)  # under the lock: what is there now, not what was there when the copy began
        if _exchange(new, target):  # one atomic step: PATH always names a whole table, old or new
            old = new
        else:  # no atomic exchange here: two renames, the first undone if the second fails
            old = target.parent / staging_name(target.name, "replaced")
            os.replace(target, old)
            try:
                os.replace(new, target)
            except BaseException:
                os.replace(old, target)
                raise
        fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where the system or
    file system cannot."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """renameat2(a, b, flags); False where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_table_root(path: Path) -> None:
    """InvalidArgumentError (naming what was found) unless `path` is a table or a sharded table's root
    as memstore writes them: a readable manifest, or only shard directories each with one. An
    overwrite deletes what is at `path`: a stray manifest.json (or shard-0/manifest.json) is not enough."""
    refuse = f"{path} exists and is not a memstore table"
    advice = "refusing to replace it: remove it yourself if it should go, or pick another path"
    if path.is_symlink() or not path.is_dir():
        kind = "a symbolic link" if path.is_symlink() else "not a directory"
        raise InvalidArgumentError(f"{refuse} ({kind}); {advice}")
    if (path / MANIFEST_NAME).exists():
        try:
            Manifest.read(path)
        except (MemstoreError, OSError, ValueError) as exc:
            raise InvalidArgumentError(f"{refuse}: its {MANIFEST_NAME} does not parse ({exc}); {advice}") from None
        return
    shards = shard_dirs(path)
    others = sorted(p.name for p in path.iterdir() if p not in shards)
    if not shards or others:
        found = ", ".join(repr(name) for name in others[:5]) + (" ..." if len(others) > 5 else "")
        raise InvalidArgumentError(f"{refuse} (no {MANIFEST_NAME}; it holds {found or 'nothing'}); {advice}")
    for shard in shards:
        try:
            manifest = Manifest.read(shard)
        except (MemstoreError, OSError, ValueError) as exc:
            raise InvalidArgumentError(
                f"{refuse}: {shard.name}/{MANIFEST_NAME} does not parse ({exc}); {advice}"
            ) from None
        if manifest.sharding is None:
            raise InvalidArgumentError(f"{refuse}: {shard.name} is a whole table, not a shard; {advice}")


def rename_noreplace(src: Path, dest: Path) -> None:
    """Rename `src` to `dest` only if nothing is at `dest` (InvalidArgumentError otherwise), atomically
    where the system has renameat2 RENAME_NOREPLACE."""
    try:
        if _renameat2(src, dest, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        pass
    else:
        if not os.path.lexists(dest):  # no atomic form here: the check and the rename are as close as they can be
            os.rename(src, dest)
            return
    raise InvalidArgumentError(
        f"{dest} appeared while the new table was being written (something else created it); nothing was "
        f"replaced and the new table was discarded: remove {dest} or pick another path, then run this again"
    )


def check_replaceable(target: Path) -> None:
    """UnavailableError while a daemon serves (or a reader reads) the table at `target` or one of its shards."""
    with _held_for_replacement(Path(target)):
        pass


@contextmanager
def _held_for_replacement(target: Path) -> Iterator[None]:
    """Exclusive locks on the table at `target` and its shards (nothing when there is none)."""
    with ExitStack() as stack:
        if target.is_dir():
            for directory in [target, *shard_dirs(target)]:
                stack.enter_context(
                    lock_table(
                        directory,
                        exclusive=True,
                        advice="--overwrite never replaces a table in use (a daemon would go on serving, or "
                        "acknowledging pushes into, the deleted files): stop it first, then run this again",
                    )
                )
        yield
