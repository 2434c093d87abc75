"""Checkpoints that are either complete or ignored.

transformers resumes from the highest-numbered checkpoint directory even when a kill left
it half-written. Here a checkpoint counts only when its completion marker, written after
everything else, is present; incomplete ones are removed before resuming, and old ones
are rotated only after the newest is known to be complete.

With several processes, each writes its part (its RNG state; its shard under FSDP/DeepSpeed),
so rank 0 writes the marker only after every rank has finished saving. The marker records
how many processes wrote the checkpoint: a resume must use as many.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from training.atomic import write_json
from training.errors import CheckpointError
from training.train.distributed import barrier

log = logging.getLogger(__name__)

MARKER = "qlora_complete.json"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# What a resume needs beyond the adapter weights, or the optimizer silently restarts; the
# optimizer is saved in a different form by each strategy.
REQUIRED_STATE = ("trainer_state.json", "scheduler.pt")
OPTIMIZER_STATE = {
    "none": ("optimizer.pt",),
    "ddp": ("optimizer.pt",),
    "fsdp": ("optimizer.bin", "optimizer_0"),  # FSDP's full or sharded optimizer state dict
    "deepspeed": ("latest",),  # names DeepSpeed's global_step*/ folder of partitioned states
}


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _PATTERN.match(p.name))]
    return sorted(found)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / MARKER).is_file()


def mark_complete(checkpoint: Path, step: int, world_size: int = 1) -> None:
    write_json(
        checkpoint / MARKER,
        {"step": step, "world_size": world_size, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )


def written_by(checkpoint: Path) -> int:
    """How many processes wrote the checkpoint (markers from before multi-GPU runs say nothing: one)."""
    return json.loads((checkpoint / MARKER).read_text(encoding="utf-8")).get("world_size", 1)


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


def check_resumable(checkpoint: Path, strategy: str = "none", world_size: int = 1) -> None:
    saved_by = written_by(checkpoint)
    if saved_by != world_size:
        raise CheckpointError(
            f"{checkpoint} was written by {saved_by} process(es) and this run has {world_size}. Resume with "
            f"{saved_by} (the global batch, data order and sharded states depend on it), or pass --force to "
            "start the run over."
        )
    missing = [name for name in REQUIRED_STATE if not (checkpoint / name).is_file()]
    if not any((checkpoint / name).exists() for name in OPTIMIZER_STATE[strategy]):
        missing.append(" or ".join(OPTIMIZER_STATE[strategy]))
    if world_size == 1:
        if not any(checkpoint.glob("rng_state*.pth")):
            missing.append("rng_state.pth")
    else:
        missing += [
            f"rng_state_{rank}.pth"
            for rank in range(world_size)
            if not (checkpoint / f"rng_state_{rank}.pth").is_file()
        ]
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
    if keep is None or keep <= 0:
        return  # as transformers' own rotation: no limit (a negative one deleted the newest)
    complete = [p for _, p in checkpoints(folder) if is_complete(p)]
    for path in complete[:-keep]:
        if protect is None or path.resolve() != protect.resolve():
            shutil.rmtree(path, ignore_errors=True)


class NothingLeftToTrain(Exception):
    """The checkpoint a run resumes from already holds its last step."""


class StopAtTheLastStep(TrainerCallback):
    """A run resumed from the checkpoint of its last step trains nothing.

    The Trainer looks for the end of training only after a step: resumed from its final checkpoint
    (a run stopped during its last evaluation or while writing the adapter), it trained one step past
    max_steps, beyond the end of the learning-rate schedule. This stops it before any batch is read.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps > 0:
            raise NothingLeftToTrain(f"step {state.global_step} of {state.max_steps}")
        return control


class IntervalsOfThisRecipe(TrainerCallback):
    """A resumed run logs, evaluates and saves at the intervals of the recipe it resumes with.

    The Trainer takes them back from the checkpoint's trainer_state.json, so a save_steps changed
    on resume (a change the recipe check allows) was ignored without a word: a run started with
    save_steps 1000 and resumed with 100 still saved every 1000 steps.
    """

    KINDS = ("logging_steps", "eval_steps", "save_steps")

    def on_train_begin(self, args, state, control, **kwargs):
        restored = {kind: getattr(state, kind) for kind in self.KINDS}
        state.compute_steps(args, state.max_steps)
        changed = [
            f"{k} {getattr(state, k):g} (was {v:g})" for k, v in restored.items() if getattr(state, k) != v
        ]
        if changed:  # transformers warns that they differ; this says which ones apply
            log.info("Resumed with the recipe's intervals: %s", ", ".join(changed))
        return control


class CompleteCheckpoints(TrainerCallback):
    """Mark each checkpoint complete once every process has written its part of it, then rotate."""

    def __init__(self, keep: int | None):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has returned from writing its part (RNG state, shards)
        if state.is_world_process_zero:
            folder = Path(args.output_dir)
            checkpoint = folder / f"checkpoint-{state.global_step}"
            mark_complete(checkpoint, state.global_step, args.world_size)
            best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
            rotate(folder, self.keep, protect=best)
        return control
