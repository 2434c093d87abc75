"""One command at a time uses a run folder: train, merge, export, eval and push of a run exclude each other.

They share one lock per run because each reads what the one before writes and cleans up what
an interrupted one left: a merge read the adapter a train was replacing, and deleted a running
merge's unfinished merged/ as the leftover of a kill (an export likewise a running export's work
folder), and a `train --force` deleted the folder a merge, an export, an eval or an upload was
reading from and writing into.

The lock is an flock on `.<run>.lock` beside the run folder (which `train --force` deletes), taken
without waiting: a second command is refused at once, naming the holder. The kernel releases it
when its process ends, however it ends, so a killed command never leaves the run locked.

A command that only reads another run (a merge of that run's adapter into a folder elsewhere, an
eval of its merged model, a train, merge or eval whose base model is its merged model) holds that
run's lock shared: commands that write the run are refused while it reads, and other readers are
not. Locks are taken in one order (by path), and none waits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from training.errors import RunInUse
from training.run_dir import RunDir

# What the holder is doing to the run, and how to stop it, by command.
_DOING = {
    "train": ("trained", "stop it (Ctrl-C saves a checkpoint)"),
    "merge": ("merged", "stop it (Ctrl-C)"),
    "export": ("exported", "stop it (Ctrl-C)"),
    "eval": ("evaluated", "stop it (Ctrl-C)"),
    "push": ("uploaded", "stop it (Ctrl-C)"),
    "read": ("read", "stop it (Ctrl-C)"),  # a shared hold: "read: by merge, pid ..."
}
# Why a reader may be unable to open a run's lock for writing (another machine's outputs/, mounted
# read-only): it opens the lock read-only instead, as flock needs no write access.
_CANNOT_CREATE = {errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def one_command_at_a_time(
    run: RunDir, command: str, *, advice: str = ".", reads: Iterable[RunDir] = ()
) -> Iterator[None]:
    """Hold the run's lock for `command` (train, merge, export, eval or push), and the lock of each
    run in `reads` shared, or raise RunInUse.

    `advice` ends the refusal's message (after "run this command again") when the run it writes is
    in use: what else the refused command can do. A run it reads gets none: another name for this
    run would not help.
    """
    holds = {_key(other): (other, True) for other in reads}
    holds[_key(run)] = (run, False)  # the run it writes is held exclusively, even if it reads it too
    with contextlib.ExitStack() as stack:
        for key in sorted(holds):
            other, shared = holds[key]
            stack.enter_context(_holding(other, command, "." if shared else advice, shared=shared))
        yield


def _key(run: RunDir) -> str:
    """One lock file under any spelling of its path (relative, through a symlink): a process that
    opened it twice would refuse itself, flock locks being per open file."""
    return os.path.realpath(run.lock)


@contextlib.contextmanager
def _holding(run: RunDir, command: str, advice: str, *, shared: bool) -> Iterator[None]:
    lock = _open(run.lock, shared=shared)
    if lock is None:
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise RunInUse(_refusal(run, lock.read().strip(), advice, run.lock)) from None
        _without_legacy_lock(run, advice)
        if lock.writable():  # with several readers, it names the latest
            lock.truncate(0)
            holder = f"read: by {command}, " if shared else f"{command}: "
            lock.write(f"{holder}pid {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
        yield


def _open(path: Path, *, shared: bool) -> IO[str] | None:
    if not shared:  # a run folder this command writes: its parent is made if need be
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+", encoding="utf-8")
    try:
        return open(path, "a+", encoding="utf-8")
    except OSError as e:
        if e.errno not in _CANNOT_CREATE:
            raise
    try:
        return open(path, encoding="utf-8")
    except FileNotFoundError:  # where this process cannot make one, no command of this stack wrote there
        return None


def _without_legacy_lock(run: RunDir, advice: str) -> None:
    """Remove the lock earlier versions took (`.<run>.train.lock`, by train alone), so that it does
    not stay behind as a hidden file; or refuse, as for this lock, while a train of such a version
    holds it: that train knows no other lock.

    Taken shared to look: two commands of this version that read the run may look at once.
    """
    # None there, or another command of this version removed it first.
    with contextlib.suppress(FileNotFoundError), open(run.legacy_lock, encoding="utf-8") as legacy:
        try:
            fcntl.flock(legacy, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f"train: {legacy.read().strip() or 'unknown'}, an earlier version of this stack"
            raise RunInUse(_refusal(run, holder, advice, run.legacy_lock)) from None
        try:
            run.legacy_lock.unlink(missing_ok=True)
        except OSError as e:
            if e.errno not in _CANNOT_CREATE:  # a reader's read-only mount keeps it: no train runs there
                raise


def _refusal(run: RunDir, holder: str, advice: str, lock: Path) -> str:
    command, _, who = holder.partition(": ")
    doing, stop = _DOING.get(command, ("used", "stop it"))
    return (
        f"{run.path} is being {doing} by another process ({who or 'unknown'}; lock {lock}). Wait for it "
        f"to finish, or {stop} and run this command again{advice}"
    )
