"""Run a recipe: QLoRA fine-tuning with TRL's SFTTrainer, resumable, interruptible, recorded.

On one process or several (one per GPU, started by training.train.launcher), with the same
outputs (training.run_dir names them). A run is a short sequence of named steps:
settings are checked, an earlier run is found (finished: nothing to do; interrupted: resume
from its newest complete checkpoint), the trainer is built, it trains, and the adapter and
run.json are written atomically. A first run that fails before its first complete checkpoint
leaves no run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from serving import mkl_vml
from training.atomic import move_into_place, remove_stale_partials, write_json
from training.errors import CheckpointError, OutOfMemory, RecipeError
from training.model.loading import compute_dtype, detect_device
from training.recipe import Recipe
from training.run_dir import ADAPTER, RUN_RECORD, RunDir
from training.run_lock import one_command_at_a_time
from training.runinfo import now, peak_memory_bytes
from training.storage import write_failure, writing_into
from training.train import checkpoints as ckpt
from training.train.builder import build_trainer
from training.train.callbacks import GracefulStop
from training.train.device_defaults import out_of_memory_advice
from training.train.distributed import (
    Ranks,
    barrier,
    from_main,
    gather_to_all,
    max_over_ranks,
    process_group_environment,
    ranks,
)
from training.train.estimate import estimate
from training.train.hardware import hardware_notes
from training.train.memtrack import track_peak
from training.train.record import log_summary, loss_metrics, run_record
from training.train.sft_config import (
    RESUMABLE_CHANGES,
    build_sft_config,
    check_training_keys,
    choices,
    save_total_limit,
)
from training.train.step_profile import StepProfiler
from training.train.throughput import Throughput

log = logging.getLogger(__name__)

# This stack's defaults that decide which rows each step sees (sft_config.sft_kwargs).
DATA_ORDER_DEFAULTS = ("train_sampling_strategy",)
# What a finished run may be rerun with: how it logs and saves. Its length made the adapter.
ADAPTER_UNCHANGED_BY = RESUMABLE_CHANGES - {"max_steps", "num_train_epochs"}


def run_training(
    recipe: Recipe, source: str, *, force: bool = False, measure_memory: bool = False, profile_steps: int = 0
) -> int:
    """Train, resuming where an earlier run of the same recipe stopped. Returns an exit code.

    `measure_memory` counts live CPU tensors for run.json's peak_memory_bytes on the CPU. It
    costs a Python call per operator, which more than halved the quickstart's speed when it was
    always on; GPUs always report their allocator's peak, which costs nothing. `profile_steps`
    records that many steps with torch.profiler into the run's profile/ (training.train.step_profile).

    Under a launcher every process runs this. Rank 0 alone writes and deletes run files;
    the others wait for it at barriers, resume from the checkpoint it chose, and take part in
    the collective steps (training, evaluation, saving).
    """
    started = time.time()
    mkl_vml.warm_up()
    run = RunDir(recipe.output.run_dir())
    world = ranks()
    _join_process_group(recipe, world, source)
    device = detect_device()
    dtype = compute_dtype(recipe.model.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    sft_args = build_sft_config(recipe, device, dtype_name, source)  # refuses bad settings before loading
    for note in hardware_notes(recipe, recipe.training, cuda=device.type == "cuda"):
        log.warning("Note: %s", note)
    check_shared_storage(run.path, world, sft_args.device)

    # Taken once the settings are checked (a refused recipe writes nothing), before anything is written.
    with _one_train_at_a_time(run, world, recipe.model.name):
        if _finished_already(run, recipe, world, force=force):
            return 0
        with _removed_if_it_fails_before_a_checkpoint(run, world):
            return _train_and_record(
                recipe,
                source,
                run,
                world,
                sft_args=sft_args,
                device=device,
                dtype=dtype,
                dtype_name=dtype_name,
                started=started,
                measure_memory=measure_memory,
                profile_steps=profile_steps,
            )


def _train_and_record(
    recipe: Recipe,
    source: str,
    run: RunDir,
    world: Ranks,
    *,
    sft_args,
    device,
    dtype,
    dtype_name: str,
    started: float,
    measure_memory: bool,
    profile_steps: int,
) -> int:
    """Resume or start, train, and write the adapter and run.json (or the checkpoint of a stop)."""
    checkpoint = _resume_point(run, recipe, world)
    _keep_data_order(run, recipe, sft_args, checkpoint, world)

    stop, throughput = GracefulStop(world), Throughput()
    callbacks = [
        ckpt.StopAtTheLastStep(),
        ckpt.IntervalsOfThisRecipe(),
        ckpt.CompleteCheckpoints(save_total_limit(recipe)),
        stop,
        throughput,
    ]
    profiler = None
    if profile_steps:
        profiler = StepProfiler(profile_steps, run.profile, cuda=device.type == "cuda", write=world.is_main)
        callbacks.append(profiler)
    built = build_trainer(recipe, sft_args, device, dtype, callbacks=callbacks)
    trainer = built.trainer
    estimated_peak = _estimated_peak(recipe, sft_args, trainer.model.config, device, world)
    stop.install()
    # The peak the memory estimator predicts (python -m training estimate), measured the same way.
    tracking = track_peak(device.type, enabled=measure_memory and not sft_args.torch_compile)
    try:
        with tracking as measured_peak:
            _run_trainer(trainer, checkpoint)
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(out_of_memory_advice(recipe, sft_args, trainer.state.global_step + 1, e)) from e
    except Exception as e:
        failure = _checkpoint_not_saved(trainer, world, e)
        if failure is None:
            raise
        raise failure from e
    finally:
        stop.uninstall()

    record = run_record(
        recipe,
        source,
        built,
        device=device,
        dtype_name=dtype_name,
        world=world,
        checkpoint=checkpoint,
        started=started,
    )
    if stop.signum is not None:
        return _stopped(trainer, run, record, stop.signum, world)

    metrics = loss_metrics(trainer, built.data.eval is not None)
    metrics.update(throughput.as_dict(), **_memory_metrics(measured_peak, world))
    metrics["estimated_peak_memory_bytes"] = estimated_peak
    if profiler is not None:  # these steps ran under the profiler: slower than the others
        metrics["profiled_steps"] = profiler.profiled_steps
    if world.world_size > 1:
        # Throughput counts the tokens of all processes (the Trainer gathers num_input_tokens_seen).
        tps = metrics.get("tokens_per_second")
        metrics["tokens_per_second_per_device"] = round(tps / world.world_size, 1) if tps else None
    record.update(metrics=metrics, finished_at=now(), duration_s=round(time.time() - started, 1))
    _save_adapter(trainer, run, record, world)
    if world.is_main:
        log_summary(record, run)
    return 0


@contextlib.contextmanager
def _one_train_at_a_time(run: RunDir, world: Ranks, base_model: str) -> Iterator[None]:
    """Refuse a second train (or a merge, export, eval or push) of the same run folder while one runs.

    Two wrote the same checkpoints, each deleted the other's unfinished one as the leftover of a
    kill (and a failing or --force one the whole folder), and both reported success.

    A base model that is another run's merged model holds that run shared: its merge --force or
    train --force would replace the weights this run loads (and, on resume, loads again).
    """
    if not world.is_main:  # the other processes of one run follow rank 0
        yield
        return
    base_run = RunDir.of_base_model(base_model)
    with one_command_at_a_time(
        run,
        "train",
        advice=" to resume; to train beside it, set output.run_name to another name.",
        reads=[base_run] if base_run is not None else [],
    ):
        yield


def _join_process_group(recipe: Recipe, world: Ranks, source: str) -> None:
    if world.world_size > 1 and recipe.distributed.strategy == "none":
        raise RecipeError(
            f"{source}: started as one of {world.world_size} processes, but distributed.strategy is none; "
            "set it to ddp, fsdp or deepspeed"
        )
    if world.world_size > 1:
        os.environ.update(process_group_environment(recipe))


def _checkpoint_not_saved(trainer, world: Ranks, error: Exception) -> OSError | None:
    """A checkpoint save the storage cut short, as the storage error naming that checkpoint (the
    CLI prints it in one line); None for any other error, and where no save was under way.

    The partial checkpoint has no completion marker, so a resume would skip it anyway; it goes now,
    to give back the space it took.
    """
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    if not checkpoint.is_dir() or ckpt.is_complete(checkpoint):
        return None
    failure = write_failure(error, checkpoint)
    if failure is not None and world.is_main:
        log.warning("Removing the checkpoint that could not be written: %s", checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return failure


def _run_trainer(trainer, checkpoint: Path | None) -> None:
    """Train, from `checkpoint` when resuming; nothing when that checkpoint holds the last step."""
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except ckpt.NothingLeftToTrain as e:
        log.info("%s holds the run's last step (%s): nothing is left to train", checkpoint, e)


def _finished_already(run: RunDir, recipe: Recipe, world: Ranks, *, force: bool) -> bool:
    """--force starts over; otherwise a complete run is left as it is."""
    if world.is_main and force and run.path.exists():
        log.info("--force: removing the earlier run in %s", run.path)
        shutil.rmtree(run.path)
    barrier()
    if run.is_trained():
        trained_with = json.loads((run.adapter / RUN_RECORD).read_text(encoding="utf-8")).get("recipe")
        changed = _recipe_changes(trained_with, recipe, ADAPTER_UNCHANGED_BY) if trained_with else []
        if changed:
            raise CheckpointError(
                f"{run.path} holds a finished run of a different recipe (changed: {'; '.join(changed)}). Its "
                "adapter was trained with the earlier one: pass --force (make train FORCE=1) to train this "
                "recipe over it, or set output.run_name to a new name."
            )
        log.info(
            "Run '%s' is already complete: %s. Pass --force (make train FORCE=1) to train it again.",
            recipe.output.run_name,
            run.adapter,
        )
        return True
    return False


@contextlib.contextmanager
def _removed_if_it_fails_before_a_checkpoint(run: RunDir, world: Ranks) -> Iterator[None]:
    """A run started afresh that fails before its first complete checkpoint leaves no run folder.

    Nothing in it could be resumed (a later run starts over), yet its recipe.json, data_order.json
    and empty checkpoints/ made outputs/ show a run that never trained. A run with a complete
    checkpoint, and so every resumed run, keeps its folder as it is: it can resume.
    """
    fresh = world.is_main and ckpt.latest_complete(run.checkpoints, remove_incomplete=False) is None
    # SIGTERM (docker stop) while the data and the model load killed the process on the spot, leaving
    # that folder; training replaces this with its graceful stop (callbacks.GracefulStop) meanwhile.
    previous = signal.signal(signal.SIGTERM, _stop_now)
    try:
        yield
    except BaseException:
        if fresh and ckpt.latest_complete(run.checkpoints, remove_incomplete=False) is None:
            _remove_unresumable(run)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_now(signum: int, frame) -> None:
    log.warning("%s received while not training: stopping", signal.Signals(signum).name)
    raise SystemExit(128 + signum)


def _remove_unresumable(run: RunDir) -> None:
    log.info("No checkpoint was complete: removing what this run wrote in %s", run.path)
    run.recipe_json.unlink(missing_ok=True)
    run.data_order_json.unlink(missing_ok=True)
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    remove_stale_partials(run.path, ADAPTER)  # an adapter save that was cut short
    # The folder too, unless something else is in it (a --profile of the steps that ran).
    with contextlib.suppress(OSError):
        run.path.rmdir()


def _resume_point(run: RunDir, recipe: Recipe, world: Ranks) -> Path | None:
    """The newest complete checkpoint of an interrupted run of this recipe, the same on every rank."""
    found = None
    if world.is_main:
        remove_stale_partials(run.path, ADAPTER)
        found = ckpt.latest_complete(run.checkpoints)
    barrier()  # incomplete checkpoints are gone before anyone looks
    chosen = from_main(str(found) if found else None)
    checkpoint = Path(chosen) if chosen else None
    if checkpoint is not None:
        ckpt.check_resumable(checkpoint, recipe.distributed.strategy, world.world_size)
        _check_same_recipe(run, recipe)
        log.info("Resuming from %s", checkpoint)
    elif world.is_main:
        write_json(run.recipe_json, recipe.to_dict())
    return checkpoint


def _keep_data_order(run: RunDir, recipe: Recipe, sft_args, checkpoint: Path | None, world: Ranks) -> None:
    """Record this stack's data-order defaults when a run starts; resume with the recorded ones.

    The Trainer resumes mid-epoch by skipping the batches already trained in the order its sampler
    gives. A default that changed since the run started (length-grouped batches on GPUs since
    2026-12-06) would give another order: some rows of that epoch trained twice, others never.
    """
    if checkpoint is None:
        if world.is_main:
            write_json(run.data_order_json, {key: getattr(sft_args, key) for key in DATA_ORDER_DEFAULTS})
        return
    training = check_training_keys(recipe.training, "<recipe>")
    if not run.data_order_json.is_file():
        log.warning(
            "%s started before this stack recorded its data-order defaults; it resumes with "
            "train_sampling_strategy=%s. If it started with another (GPU runs before 2026-12-06 used "
            'random), write {"train_sampling_strategy": "random"} to %s and run again, or the rest of '
            "this epoch may repeat some rows and skip others.",
            run.path,
            sft_args.train_sampling_strategy,
            run.data_order_json,
        )
        return
    recorded = _recorded_data_order(run.data_order_json)
    for key, value in recorded.items():
        if key not in training and getattr(sft_args, key) != value:
            log.info(
                "Resuming with %s=%s, as this run started (the default is now %s)",
                key,
                value,
                getattr(sft_args, key),
            )
            setattr(sft_args, key, value)


def _recorded_data_order(path: Path) -> dict[str, str]:
    """data_order.json, checked: users may write it by hand (the advice above)."""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(recorded, dict):
        raise CheckpointError(f'{path}: expected an object such as {{"train_sampling_strategy": "random"}}')
    for key, value in recorded.items():
        if key not in DATA_ORDER_DEFAULTS:
            raise CheckpointError(
                f"{path}: {key!r} is not recorded there; allowed: {', '.join(DATA_ORDER_DEFAULTS)}"
            )
        allowed = choices(key)
        if allowed and value not in allowed:
            raise CheckpointError(f"{path}: {key} {value!r} is not one of {', '.join(allowed)}")
    return recorded


def _stopped(trainer, run: RunDir, record: dict, signum: int, world: Ranks) -> int:
    """A signal stopped training after a checkpoint: record where, and exit 128 + signal."""
    if world.is_main:
        saved = ckpt.latest_complete(run.checkpoints, remove_incomplete=False)
        record.update(
            status="interrupted", signal=signum, checkpoint=str(saved), global_step=trainer.state.global_step
        )
        write_json(run.run_json, record)
        log.warning(
            "Stopped at step %d; checkpoint saved in %s. Run the same command again to resume.",
            trainer.state.global_step,
            saved,
        )
    return 128 + signum


def _memory_metrics(measured_peak, world: Ranks) -> dict:
    peaks = gather_to_all(peak_memory_bytes())
    tensor_peaks = gather_to_all(measured_peak.bytes)
    metrics = {
        # Tensor memory at its peak on the busiest device (the number to compare with the estimate).
        "peak_memory_bytes": None if None in tensor_peaks else max(tensor_peaks),
        "peak_memory_measure": measured_peak.measure,
        "peak_memory": peaks[0],
    }
    if world.world_size > 1:
        metrics["peak_memory_bytes_per_rank"] = tensor_peaks
        metrics["peak_memory_per_rank"] = peaks
    return metrics


def _estimated_peak(recipe: Recipe, sft_args, config, device, world: Ranks) -> int | None:
    """What `python -m training estimate` predicts for this run with its defaults as they were decided,
    recorded beside the measured peak so that every run checks the estimator (None where it does
    not know the architecture)."""
    training = check_training_keys(recipe.training, "<recipe>")
    training.update(
        activation_checkpointing=bool(sft_args.activation_checkpointing),
        use_liger_kernel=bool(sft_args.use_liger_kernel),
    )
    as_run = recipe.model_copy(update={"training": training})
    try:
        return estimate(as_run, config, device=device.type, gpus=world.world_size).allocated_peak
    except RecipeError:  # an architecture or a setting it does not model
        return None
    except Exception as e:  # noqa: BLE001 - a figure for the record must never stop a run
        log.warning("The memory estimate for run.json failed (%s: %s); training goes on", type(e).__name__, e)
        return None


def _save_adapter(trainer, run: RunDir, record: dict, world: Ranks) -> None:
    """Build the adapter beside its place, write run.json, and rename the adapter into place.

    Every rank calls save_model (FSDP gathers the sharded LoRA weights for it) with the same
    path, so the path is fixed rather than a fresh temporary name per process; stale copies
    from a killed run were removed at start-up. The adapter goes last: in place, it makes the run
    finished (RunDir.is_trained), and a rerun of a finished run writes nothing, run.json included.
    A save that fails leaves no copy: the storage error names adapter/ (the CLI prints it in one
    line), and the rerun resumes from the run's last checkpoint, which holds its last step, and
    only evaluates and saves.
    """
    tmp = run.path / f".{ADAPTER}.partial-save"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    try:
        with writing_into(run.adapter):
            trainer.save_model(str(tmp))
            barrier()  # every rank's part is written
            if world.is_main:
                # The Trainer pickles its arguments beside the weights; run.json records them instead,
                # and a published artifact should hold nothing that runs code when loaded.
                (tmp / "training_args.bin").unlink(missing_ok=True)
                write_json(tmp / RUN_RECORD, record)
                write_json(run.run_json, record)
                move_into_place(tmp, run.adapter, replace=True)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()  # no rank reports success before the adapter is in place


def check_shared_storage(run_dir: Path, world: Ranks, device: torch.device | str) -> None:
    """Across machines, every rank must see the same outputs/ (checkpoints are written by all ranks)."""
    if not world.several_machines:
        return
    probe = run_dir / f".shared-storage-check-{from_main(secrets.token_hex(8))}"
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("rank 0 wrote this\n", encoding="utf-8")
    barrier()
    blind = max_over_ranks(0 if probe.is_file() else 1, device)
    barrier()
    if world.is_main:
        probe.unlink(missing_ok=True)
    if blind:
        raise CheckpointError(
            f"{run_dir} is not the same folder on every machine: a file rank 0 wrote there is missing on "
            "another machine. Checkpoints are written by every process and resumed by all, so output.dir "
            "must be on storage shared by all machines (NFS, a cluster filesystem) at the same path."
        )


def _check_same_recipe(run: RunDir, recipe: Recipe) -> None:
    """Refuse to resume a checkpoint with a recipe that changes what the checkpoint means."""
    if not run.recipe_json.is_file():
        return
    before = json.loads(run.recipe_json.read_text(encoding="utf-8"))
    changed = _recipe_changes(before, recipe, RESUMABLE_CHANGES)
    if changed:
        raise CheckpointError(
            f"{run.path} holds checkpoints of a different recipe (changed: {'; '.join(changed)}). "
            "Resume with the original recipe, pass --force to start over, or set output.run_name to a new name."
        )


def _recipe_changes(before: dict, recipe: Recipe, unchanging: Collection[str]) -> list[str]:
    """`key: old -> new` for what `recipe` changes of `before`, but where the run lives, how it is judged,
    and the training keys in `unchanging`."""
    return [
        f"{key}: {old!r} -> {new!r}"
        for key, old, new in _diff(_read_as_this_version(before), recipe.to_dict())
        if key.split(".", 1)[0] not in ("output", "eval")  # where the run lives and how it is judged
        and not (key.startswith("training.") and key.split(".", 1)[1] in unchanging)
    ]


def _read_as_this_version(recorded: dict) -> dict:
    """A recorded recipe with the keys added since it was recorded at their defaults, so that
    upgrading the stack alone changes no recipe. One this version cannot read (a key since removed
    or renamed) is compared as it was recorded."""
    try:
        return Recipe.model_validate(recorded).to_dict()
    except ValidationError:
        return recorded


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]
