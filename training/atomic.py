"""Write files and directories so that readers never see them half-written.

Everything is first written beside the target (same filesystem, so the final rename is
atomic) and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` (write_text's, or a writer's that wants a file name: savefig);
    it becomes `path` when the block succeeds and is removed when it fails. It keeps `path`'s
    suffix, from which such writers take the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; readers may be other users
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:  # disk full names no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def temp_dir_beside(target: str | os.PathLike) -> Path:
    """A fresh, empty directory next to `target`, named so it is recognisably unfinished."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))


def move_into_place(tmp: Path, target: str | os.PathLike, *, replace: bool = False) -> None:
    """Move a finished temporary directory to `target`.

    With `replace`, an existing target is exchanged with the new directory in one atomic step
    (Linux renameat2 RENAME_EXCHANGE): readers and a crash see either the old or the new
    directory, never neither. Where the filesystem cannot exchange (NFS, old kernels, other
    systems) the old directory is renamed aside to `.<name>.old-<pid>` first and deleted only
    after the new one is in place; a crash between the two renames leaves that copy, which
    `remove_stale_partials` puts back.
    """
    target = Path(target)
    _make_readable(tmp)
    if not target.exists():
        os.rename(tmp, target)
        return
    if not replace:
        raise FileExistsError(target)
    if exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# linux/fs.h; renameat2 is in glibc since 2.28 (and in musl).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# What renameat2 answers where the kernel or the filesystem cannot exchange: fall back.
_CANNOT_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths atomically; False where this system or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _CANNOT_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_readable(root: Path) -> None:
    """Give a published tree the permissions a normal write would have had.

    mkdtemp/mkstemp create 0700/0600, which would lock out a server container that runs
    as another user and mounts the directory read-only.
    """
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


@contextlib.contextmanager
def building_dir(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` when the block succeeds."""
    tmp = temp_dir_beside(target)
    try:
        yield tmp
        move_into_place(tmp, target, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_partials(parent: str | os.PathLike, name: str) -> list[Path]:
    """Clean up after interrupted builds of `parent/name` (from a killed process).

    Unfinished `.<name>.partial-*` directories are deleted. An `.<name>.old-*` copy is deleted
    when `name` is in place, and put back when it is not: a replacement that could not
    exchange atomically was killed between its two renames, and the old copy is then the
    only complete one. Returns what was deleted.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    stale = [p for p in parent.glob(f".{name}.partial-*") if p.is_dir()]
    old = sorted((p for p in parent.glob(f".{name}.old-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    target = parent / name
    if old and not target.exists():
        os.rename(old.pop(), target)  # the newest complete copy
    stale += old
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale
