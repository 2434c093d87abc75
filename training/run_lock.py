"""One command at a time uses a run folder: train, merge, export, eval and push of a run exclude each other.

They share one lock per run because each reads what the one before writes and cleans up what
an interrupted one left: a merge read the adapter a train was replacing, and deleted a running
merge's unfinished merged/ as the leftover of a kill (an export likewise a running export's work
folder), and a `train --force` deleted the folder a merge, an export, an eval or an upload was
reading from and writing into.

The lock is an flock on `.<run>.lock` beside the run folder (which `train --force` deletes), taken
without waiting: a second command is refused at once, naming the holder. The kernel releases it
when its process ends, however it ends, so a killed command never leaves the run locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

from training.errors import RunInUse
from training.run_dir import RunDir

# What the holder is doing to the run, and how to stop it, by command.
_DOING = {
    "train": ("trained", "stop it (Ctrl-C saves a checkpoint)"),
    "merge": ("merged", "stop it (Ctrl-C)"),
    "export": ("exported", "stop it (Ctrl-C)"),
    "eval": ("evaluated", "stop it (Ctrl-C)"),
    "push": ("uploaded", "stop it (Ctrl-C)"),
}


@contextlib.contextmanager
def one_command_at_a_time(run: RunDir, command: str, *, advice: str = ".") -> Iterator[None]:
    """Hold the run's lock for `command` (train, merge, export, eval or push), or raise RunInUse.

    `advice` ends the refusal's message (after "run this command again"): what else the refused
    command can do.
    """
    run.lock.parent.mkdir(parents=True, exist_ok=True)
    with open(run.lock, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise RunInUse(_refusal(run, lock.read().strip(), advice)) from None
        lock.truncate(0)
        lock.write(f"{command}: pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


def _refusal(run: RunDir, holder: str, advice: str) -> str:
    command, _, who = holder.partition(": ")
    doing, stop = _DOING.get(command, ("used", "stop it"))
    return (
        f"{run.path} is being {doing} by another process ({who or 'unknown'}; lock {run.lock}). Wait for it "
        f"to finish, or {stop} and run this command again{advice}"
    )
