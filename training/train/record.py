"""What a run writes into run.json, and the summary it prints at the end."""

from __future__ import annotations

import logging
import time

from training.recipe import Recipe
from training.run_dir import RunDir
from training.runinfo import human_size, versions
from training.train.builder import BuiltTrainer
from training.train.distributed import Ranks

log = logging.getLogger(__name__)

# What a loss curve needs from the Trainer's log, one entry per logging or evaluation step.
HISTORY_KEYS = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")


def run_record(
    recipe: Recipe,
    source: str,
    built: BuiltTrainer,
    *,
    device,
    dtype_name: str,
    world: Ranks,
    checkpoint,
    started: float,
) -> dict:
    """run.json without its metrics: what was trained, on what, with which packages."""
    trainer = built.trainer
    return {
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
            # sdpa_varlen where packed batches attend per example (training.model.varlen_attention)
            "attn_implementation": trainer.model.config._attn_implementation,
        },
        "data": {
            **built.data.report(),
            "max_length": recipe.data.max_length,
            "packing": recipe.data.packing,
            "completion_only_loss": recipe.data.loss_on_completion_only,
            "train_sampling_strategy": trainer.args.train_sampling_strategy,
        },
        "resumed_from": str(checkpoint) if checkpoint else None,
        "history": history(trainer.state.log_history),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    }


def loss_metrics(trainer, has_eval: bool) -> dict:
    """Steps and losses; the final evaluation is collective, so every rank calls this."""
    log_history = trainer.state.log_history
    eval_losses = [h["eval_loss"] for h in log_history if "eval_loss" in h]
    train_losses = [h["loss"] for h in log_history if "loss" in h]
    final_eval = trainer.evaluate()["eval_loss"] if has_eval else None
    return {
        "global_step": trainer.state.global_step,
        "epoch": round(trainer.state.epoch or 0, 3),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "eval_loss_start": eval_losses[0] if eval_losses else None,
        "eval_loss": final_eval,
    }


def history(log_history: list[dict]) -> list[dict]:
    """The logged losses of the whole run (a resumed run's log starts at its first step)."""
    out = []
    for entry in log_history:
        row = {k: entry[k] for k in HISTORY_KEYS if isinstance(entry.get(k), (int, float))}
        if "loss" in row or "eval_loss" in row:
            out.append(row)
    return out


def _change(first: float | None, last: float | None) -> str:
    """`7.8668 -> 7.1687`, or one figure when only one loss was logged."""
    if first is None and last is None:
        return "not logged"
    if first is None or last is None or first == last:
        return f"{first if last is None else last:.4f}"
    return f"{first:.4f} -> {last:.4f}"


def _speed(tokens_per_second: float | None) -> str:
    # None: this session trained no step (it resumed from the run's last checkpoint)
    return "no step trained in this session" if tokens_per_second is None else f"{tokens_per_second} tokens/s"


def log_summary(record: dict, run: RunDir) -> None:
    m = record["metrics"]
    lines = [
        f"Run '{record['run_name']}' complete in {record['duration_s']:.0f} s: {m['global_step']} steps",
        f"  train loss      {_change(m['train_loss_first'], m['train_loss_last'])}",
    ]
    if m["eval_loss"] is not None:
        lines.append(f"  eval loss       {_change(m['eval_loss_start'], m['eval_loss'])}")
    memory = (
        f"{human_size(m['peak_memory_bytes'])} of tensors ({m['peak_memory_measure']})"
        if m["peak_memory_bytes"] is not None
        else f"{human_size(m['peak_memory']['process_rss'])} (process RSS)"
    )
    if m.get("estimated_peak_memory_bytes") and m["peak_memory_bytes"] is not None:
        memory += f"; estimated {human_size(m['estimated_peak_memory_bytes'])} for rows of max_length tokens"
    lines += [
        f"  speed           {_speed(m['tokens_per_second'])}",
        f"  peak memory     {memory}",
        f"  adapter         {run.adapter}",
        f"  record          {run.run_json}",
    ]
    log.info("\n".join(lines))
