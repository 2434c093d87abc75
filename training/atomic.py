"""Write files and directories so that readers never see them half-written.

Everything is first written beside the target (same filesystem, so the final rename is
atomic) and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; readers may be other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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

    With `replace`, an existing target is swapped out first and deleted only after the
    new one is in place, so a crash leaves either the old or the new directory.
    """
    target = Path(target)
    _make_readable(tmp)
    old = None
    if target.exists():
        if not replace:
            raise FileExistsError(target)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    """Delete leftovers of interrupted builds of `parent/name` (from a killed process)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    stale = [p for p in parent.glob(f".{name}.partial-*") if p.is_dir()]
    stale += [p for p in parent.glob(f".{name}.old-*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale
