"""Checkpoints that are either complete or ignored.

transformers resumes from the highest-numbered checkpoint directory even when a kill left
it half-written. Here a checkpoint counts only when its completion marker, written after
everything else, is present; incomplete ones are removed before resuming, and old ones
are rotated only after the newest is known to be complete.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from training.atomic import write_json
from training.errors import CheckpointError

log = logging.getLogger(__name__)

MARKER = "qlora_complete.json"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# What a resume needs beyond the adapter weights, or the optimizer silently restarts.
REQUIRED_STATE = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _PATTERN.match(p.name))]
    return sorted(found)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / MARKER).is_file()


def mark_complete(checkpoint: Path, step: int) -> None:
    write_json(checkpoint / MARKER, {"step": step, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def latest_complete(folder: Path, *, remove_incomplete: bool = True) -> Path | None:
    """The newest complete checkpoint; incomplete ones (from a kill mid-save) are deleted."""
    latest = None
    for _, path in checkpoints(folder):
        if is_complete(path):
            latest = path
        elif remove_incomplete:
            log.warning("Removing incomplete checkpoint %s (interrupted while saving)", path)
            shutil.rmtree(path)
    return latest


def check_resumable(checkpoint: Path) -> None:
    missing = [name for name in REQUIRED_STATE if not (checkpoint / name).is_file()]
    if not any(checkpoint.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if not any(checkpoint.glob("adapter_model.*")):
        missing.append("adapter_model.safetensors")
    if missing:
        raise CheckpointError(
            f"{checkpoint}: cannot resume, the checkpoint lacks {', '.join(missing)}. Resuming without "
            "them would silently restart the optimizer or data order. Restore the files, delete this "
            "checkpoint to resume from an earlier one, or pass --force to start the run over."
        )


def rotate(folder: Path, keep: int | None, protect: Path | None = None) -> None:
    """Keep the newest `keep` complete checkpoints (and `protect`, e.g. the best one)."""
    if not keep:
        return
    complete = [p for _, p in checkpoints(folder) if is_complete(p)]
    for path in complete[:-keep]:
        if protect is None or path.resolve() != protect.resolve():
            shutil.rmtree(path, ignore_errors=True)


class CompleteCheckpoints(TrainerCallback):
    """Mark each checkpoint complete once the Trainer has written all of it, then rotate."""

    def __init__(self, keep: int | None):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir)
            checkpoint = folder / f"checkpoint-{state.global_step}"
            mark_complete(checkpoint, state.global_step)
            best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
            rotate(folder, self.keep, protect=best)
        return control
