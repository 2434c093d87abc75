"""Run a recipe: QLoRA fine-tuning with TRL's SFTTrainer, resumable, interruptible, recorded.

On one process or several (one per GPU, started by training.launch), with the same outputs:

outputs/<run>/
  recipe.json           the resolved recipe the run started with (checked on resume)
  checkpoints/          checkpoint-N/ with a completion marker; the newest complete one resumes
  adapter/              the finished peft adapter + tokenizer (chat_template) + run.json
  run.json              what the run did: data counts, losses, speed, memory, versions
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from training import checkpoints as ckpt
from training.atomic import publish_dir, remove_stale_partials, write_json
from training.distributed import (
    Ranks,
    barrier,
    from_main,
    gather_to_all,
    max_over_ranks,
    process_group_environment,
    ranks,
)
from training.errors import CheckpointError, RecipeError
from training.hardware import hardware_notes
from training.memtrack import track_peak
from training.model import compute_dtype, detect_device, human_size, load_model, load_tokenizer
from training.recipe import Recipe
from training.runinfo import now, peak_memory_bytes, versions
from training.sft_args import RESUMABLE_CHANGES, build_sft_config, save_total_limit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.run_dir / "adapter"

    @property
    def run_json(self) -> Path:
        return self.run_dir / "run.json"

    @property
    def recipe_json(self) -> Path:
        return self.run_dir / "recipe.json"

    def is_complete(self) -> bool:
        return (self.adapter / "adapter_config.json").is_file() and (self.adapter / "run.json").is_file()


class GracefulStop(TrainerCallback):
    """SIGTERM (docker stop) or Ctrl-C: finish the step, save a checkpoint, stop.

    A second signal stops at once. With several processes, the launcher passes the signal on to
    each, but they may get it in different steps; after every step they agree (the largest
    signal number of any rank), so all of them save the same step and none waits for the others
    in a collective that never comes.
    """

    def __init__(self, world: Ranks | None = None) -> None:
        self.signum: int | None = None
        self.world = world or Ranks()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.world.is_main:
            log.warning(
                "%s received: saving a checkpoint after the current step, then stopping "
                "(send it again to stop at once)",
                signal.Signals(signum).name,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.world.world_size > 1:
            agreed = max_over_ranks(self.signum or 0, args.device)
            if agreed and self.signum is None:
                self.signum = agreed  # another rank (maybe on another machine) was signalled
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class Throughput(TrainerCallback):
    """Tokens per second of this session (a resumed run counts only what it trained itself).

    `steady_tokens_per_second` leaves out the first optimizer step, which also pays for
    CUDA kernel selection, allocator growth and torch.compile: on a short run it is the
    figure that predicts a long one.
    """

    def __init__(self) -> None:
        self.start_time = self.end_time = 0.0
        self.start_tokens = self.end_tokens = 0
        self.warm: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.warm is None:
            self.warm = (time.perf_counter(), state.num_input_tokens_seen)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.end_time, self.end_tokens = time.perf_counter(), state.num_input_tokens_seen
        return control

    def as_dict(self) -> dict:
        seconds = self.end_time - self.start_time
        tokens = self.end_tokens - self.start_tokens
        result = {
            "train_seconds": round(seconds, 2),
            "tokens_trained": int(tokens),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "steady_tokens_per_second": None,
        }
        if self.warm is not None and self.end_time > self.warm[0] and self.end_tokens > self.warm[1]:
            steady = (self.end_tokens - self.warm[1]) / (self.end_time - self.warm[0])
            result["steady_tokens_per_second"] = round(steady, 1)
        return result


def run_training(recipe: Recipe, source: str, *, force: bool = False) -> int:
    """Train, resuming where an earlier run of the same recipe stopped. Returns an exit code.

    Under a launcher every process runs this. Rank 0 alone writes and deletes run files;
    the others wait for it at barriers, resume from the checkpoint it chose, and take part in
    the collective steps (training, evaluation, saving).
    """
    started = time.time()
    paths = RunPaths(recipe.output.run_dir())
    world = ranks()
    if world.world_size > 1 and recipe.distributed.strategy == "none":
        raise RecipeError(
            f"{source}: started as one of {world.world_size} processes, but distributed.strategy is none; "
            "set it to ddp, fsdp or deepspeed"
        )
    if world.world_size > 1:
        os.environ.update(process_group_environment(recipe))
    device = detect_device()
    dtype = compute_dtype(recipe.model.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    sft_args = build_sft_config(recipe, device, dtype_name, source)  # refuses bad settings before loading
    for note in hardware_notes(recipe, recipe.training, cuda=device.type == "cuda"):
        log.warning("Note: %s", note)
    check_shared_storage(paths.run_dir, world, sft_args.device)

    if world.is_main and force and paths.run_dir.exists():
        log.info("--force: removing the earlier run in %s", paths.run_dir)
        shutil.rmtree(paths.run_dir)
    barrier()
    if paths.is_complete():
        log.info(
            "Run '%s' is already complete: %s. Pass --force (make train FORCE=1) to train it again.",
            recipe.output.run_name,
            paths.adapter,
        )
        return 0
    found = None
    if world.is_main:
        remove_stale_partials(paths.run_dir, "adapter")
        found = ckpt.latest_complete(paths.checkpoints)
    barrier()  # incomplete checkpoints are gone before anyone looks
    chosen = from_main(str(found) if found else None)  # every rank resumes from the same one
    checkpoint = Path(chosen) if chosen else None
    if checkpoint is not None:
        ckpt.check_resumable(checkpoint, recipe.distributed.strategy, world.world_size)
        _check_same_recipe(paths, recipe)
        log.info("Resuming from %s", checkpoint)
    elif world.is_main:
        write_json(paths.recipe_json, recipe.to_dict())

    stop, throughput = GracefulStop(world), Throughput()
    built = build_trainer(
        recipe,
        sft_args,
        device,
        dtype,
        callbacks=[ckpt.CompleteCheckpoints(save_total_limit(recipe)), stop, throughput],
    )
    trainer, data = built.trainer, built.data

    stop.install()
    # The peak the memory estimator predicts (python -m training estimate), measured the same way.
    tracking = track_peak(device.type, enabled=not sft_args.torch_compile)
    try:
        with tracking as measured_peak:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        stop.uninstall()

    record = {
        "status": "complete",
        "run_name": recipe.output.run_name,
        "recipe_path": source,
        "recipe": recipe.to_dict(),
        "versions": versions(),
        "device": device.as_dict(),
        "processes": world.as_dict(),
        "compute_dtype": dtype_name,
        "model": {
            "name": recipe.model.name,
            "revision": recipe.model.revision,
            **built.model_report,
            "trainable_parameters": built.trainable,
            "total_parameters": built.total,
            "lora_target_modules": sorted(trainer.model.peft_config["default"].target_modules),
        },
        "data": {
            **data.report(),
            "max_length": recipe.data.max_length,
            "packing": recipe.data.packing,
            "completion_only_loss": recipe.data.loss_on_completion_only,
        },
        "resumed_from": str(checkpoint) if checkpoint else None,
        "history": _history(trainer.state.log_history),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    }
    if stop.signum is not None:
        if world.is_main:
            saved = ckpt.latest_complete(paths.checkpoints, remove_incomplete=False)
            record.update(
                status="interrupted",
                signal=stop.signum,
                checkpoint=str(saved),
                global_step=trainer.state.global_step,
            )
            write_json(paths.run_json, record)
            log.warning(
                "Stopped at step %d; checkpoint saved in %s. Run the same command again to resume.",
                trainer.state.global_step,
                saved,
            )
        return 128 + stop.signum

    metrics = _metrics(trainer, data.eval is not None)  # every rank: evaluation is collective
    peaks = gather_to_all(peak_memory_bytes())
    tensor_peaks = gather_to_all(measured_peak.bytes)
    metrics.update(
        throughput.as_dict(),
        # Tensor memory at its peak on the busiest device (the number to compare with the estimate).
        peak_memory_bytes=None if None in tensor_peaks else max(tensor_peaks),
        peak_memory_measure=measured_peak.measure,
        peak_memory=peaks[0],
    )
    if world.world_size > 1:
        metrics["peak_memory_bytes_per_rank"] = tensor_peaks
        metrics["peak_memory_per_rank"] = peaks
        # Throughput counts the tokens of all processes (the Trainer gathers num_input_tokens_seen).
        tps = metrics.get("tokens_per_second")
        metrics["tokens_per_second_per_device"] = round(tps / world.world_size, 1) if tps else None
    record.update(metrics=metrics, finished_at=now(), duration_s=round(time.time() - started, 1))
    _save_adapter(trainer, paths, record, world)
    if world.is_main:
        _log_summary(record, paths)
    return 0


@dataclass
class BuiltTrainer:
    trainer: Any
    data: Any
    model_report: dict
    trainable: int
    total: int


def build_trainer(recipe: Recipe, sft_args, device, dtype, *, callbacks=()) -> BuiltTrainer:
    """Tokenizer, data, 4-bit model and SFTTrainer for a recipe, as a run trains them."""
    from trl import SFTTrainer

    from training.data import prepare_data
    from training.distributed import shards_weights
    from training.lora import lora_config

    world = ranks()
    tokenizer = load_tokenizer(recipe.model)
    truncates = not (recipe.data.packing and sft_args.packing_strategy in ("bfd_split", "wrapped"))
    data = prepare_data(recipe.data, tokenizer, truncates=truncates)
    _log_data(recipe, data)
    tokenizer.chat_template = data.chat_template  # checkpoints and the adapter carry the training format

    model, model_report = load_model(
        recipe.model,
        recipe.quantization,
        device,
        dtype,
        sharded=shards_weights(recipe),
        local_rank=world.local_rank if world.world_size > 1 else None,
    )
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora, model),
        callbacks=list(callbacks),
    )
    if dtype == torch.float32:
        # TRL stores the LoRA weights of a quantized model in bf16, as QLoRA does on GPUs.
        # Computing in float32 (the CPU), that only adds casts and emulated bf16 matmuls.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info(
        "Trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total
    )
    return BuiltTrainer(trainer, data, model_report, trainable, total)


def _save_adapter(trainer, paths: RunPaths, record: dict, world: Ranks) -> None:
    """Build the adapter beside its place and rename it when complete.

    Every rank calls save_model (FSDP gathers the sharded LoRA weights for it) with the same
    path, so the path is fixed rather than a fresh temporary name per process; stale copies
    from a killed run were removed at start-up.
    """
    tmp = paths.run_dir / ".adapter.partial-save"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    trainer.save_model(str(tmp))
    barrier()  # every rank's part is written
    if world.is_main:
        try:
            # The Trainer pickles its arguments beside the weights; run.json records them instead,
            # and a published artifact should hold nothing that runs code when loaded.
            (tmp / "training_args.bin").unlink(missing_ok=True)
            write_json(tmp / "run.json", record)
            publish_dir(tmp, paths.adapter, replace=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_json(paths.run_json, record)
    barrier()  # no rank reports success before the adapter is in place


def check_shared_storage(run_dir: Path, world: Ranks, device) -> None:
    """Across machines, every rank must see the same outputs/ (checkpoints are written by all ranks)."""
    if not world.several_machines:
        return
    import secrets

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


def _metrics(trainer, has_eval: bool) -> dict:
    history = trainer.state.log_history
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    train_losses = [h["loss"] for h in history if "loss" in h]
    final_eval = trainer.evaluate()["eval_loss"] if has_eval else None
    return {
        "global_step": trainer.state.global_step,
        "epoch": round(trainer.state.epoch or 0, 3),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "eval_loss_start": eval_losses[0] if eval_losses else None,
        "eval_loss": final_eval,
    }


# What a loss curve needs from the Trainer's log, one entry per logging or evaluation step.
HISTORY_KEYS = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")


def _history(log_history: list[dict]) -> list[dict]:
    """The logged losses of the whole run (a resumed run's log starts at its first step)."""
    out = []
    for entry in log_history:
        row = {k: entry[k] for k in HISTORY_KEYS if isinstance(entry.get(k), (int, float))}
        if "loss" in row or "eval_loss" in row:
            out.append(row)
    return out


def _check_same_recipe(paths: RunPaths, recipe: Recipe) -> None:
    """Refuse to resume a checkpoint with a recipe that changes what the checkpoint means."""
    if not paths.recipe_json.is_file():
        return
    import json

    before = json.loads(paths.recipe_json.read_text(encoding="utf-8"))
    changed = [
        f"{key}: {old!r} -> {new!r}"
        for key, old, new in _diff(before, recipe.to_dict())
        if not key.startswith("output.")  # where the run lives, not what it does
        and not (key.startswith("training.") and key.split(".", 1)[1] in RESUMABLE_CHANGES)
    ]
    if changed:
        raise CheckpointError(
            f"{paths.run_dir} holds checkpoints of a different recipe (changed: {'; '.join(changed)}). "
            "Resume with the original recipe, pass --force to start over, or set output.run_name to a new name."
        )


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _log_data(recipe: Recipe, data) -> None:
    cfg = recipe.data
    for name, report in (("train", data.train_report), ("validation", data.eval_report)):
        if report is None:
            continue
        t = report.tokens
        log.info(
            "Data %s: %d rows from %s (%d malformed skipped, %d over max_length, %d dropped with no "
            "response left); %s tokens, %s count toward the loss; longest row %d tokens",
            name,
            t.rows,
            report.source,
            report.rows_skipped_bad,
            t.rows_over_max_length,
            t.rows_dropped_no_loss,
            f"{t.tokens:,}",
            f"{t.loss_tokens:,}",
            t.longest,
        )
    log.info(
        "Effective limits: max_length=%d (longer rows are truncated), packing=%s, loss on %s",
        cfg.max_length,
        "on" if cfg.packing else "off",
        "responses only" if cfg.loss_on_completion_only else "all tokens",
    )


def _log_summary(record: dict, paths: RunPaths) -> None:
    m = record["metrics"]
    memory = m["peak_memory"]
    lines = [
        f"Run '{record['run_name']}' complete in {record['duration_s']:.0f} s: {m['global_step']} steps",
        f"  train loss      {m['train_loss_first']} -> {m['train_loss_last']}",
    ]
    if m["eval_loss"] is not None:
        lines.append(f"  eval loss       {m['eval_loss_start']} -> {m['eval_loss']:.4f}")
    lines += [
        f"  speed           {m['tokens_per_second']} tokens/s",
        f"  peak memory     {human_size(m['peak_memory_bytes'])} of tensors ({m['peak_memory_measure']})"
        if m["peak_memory_bytes"] is not None
        else f"  peak memory     {human_size(memory['process_rss'])} (process RSS)",
        f"  adapter         {paths.adapter}",
        f"  record          {paths.run_json}",
    ]
    log.info("\n".join(lines))
