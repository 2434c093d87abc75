"""Defaults that depend on the device and the model, decided once the model is loaded.

Where the recipe leaves them unset:

  activation checkpointing   off where the estimated peak without it fits a share of the
                             device's memory (training.train.estimate.UNCHECKPOINTED_SHARE):
                             recomputing every layer costs about a third of a step
  Liger's kernels (GPUs)     RMSNorm, RoPE and SwiGLU as Triton kernels, where liger-kernel is
                             installed and knows the architecture (the CUDA image installs it)
  LoRA dropout (CPU)         fused into lora_A (training.model.lora_dropout)

A value in the recipe always wins. Every rank of a distributed run takes the same decisions.
"""

from __future__ import annotations

import logging

import torch

from training.errors import RecipeError
from training.model.lora_dropout import fuse_lora_dropout
from training.recipe import Recipe
from training.train.distributed import ranks
from training.train.estimate import (
    UNCHECKPOINTED_SHARE,
    checkpointing_is_default,
    checkpointing_reason,
    estimate,
    memory_budget,
)
from training.train.hardware import liger_supports
from training.train.sft_config import check_training_keys

log = logging.getLogger(__name__)


def apply_model_defaults(recipe: Recipe, config, sft_args, device) -> None:
    """Set the SFTConfig's device- and model-dependent defaults (before the trainer is built)."""
    training = check_training_keys(recipe.training, "<recipe>")
    if device.type == "cuda" and "use_liger_kernel" not in training:
        sft_args.use_liger_kernel = liger_supports(config.model_type)
        if sft_args.use_liger_kernel:
            log.info("Liger's kernels (RMSNorm, RoPE, SwiGLU) on for %s (GPU default)", config.model_type)
    world = ranks()
    if not checkpointing_is_default(training, recipe.distributed.strategy, world.world_size):
        return
    budget = memory_budget(device.type, gpu_memory_available() if device.type == "cuda" else None)
    try:
        est = estimate(recipe, config, device=device.type, gpus=world.world_size, memory=budget)
    except RecipeError:  # an architecture the estimator does not know: the recipe's default, on
        checkpointing, reason = True, "on (the memory estimator does not know this architecture)"
    else:
        checkpointing, reason = est.setup.checkpointing, checkpointing_reason(est, budget)
    # TRL still reads the old name; TrainingArguments mirrors them only when it is built.
    sft_args.activation_checkpointing = sft_args.gradient_checkpointing = checkpointing
    log.info("Activation checkpointing %s", reason)


def apply_trainer_defaults(trainer, device) -> None:
    """What changes the trainer's model once peft has wrapped it."""
    if device.type == "cpu":
        # Same dropout, one byte of mask kept per element instead of two float copies of the input.
        fused = fuse_lora_dropout(trainer.model)
        if fused:
            log.info("LoRA dropout fused into lora_A in %d layers (CPU default)", fused)


def gpu_memory_available() -> int:
    """Bytes this process can hold on its GPU: what is free plus what it already holds (the 4-bit
    weights). The smallest over all ranks, so that every rank decides alike."""
    index = torch.cuda.current_device()
    free, _total = torch.cuda.mem_get_info(index)
    available = free + torch.cuda.memory_reserved(index)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        smallest = torch.tensor([available], dtype=torch.int64, device=f"cuda:{index}")
        torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
        available = int(smallest.item())
    return available


def out_of_memory_advice(recipe: Recipe, sft_args, step: int, error: BaseException) -> str:
    """What to change after the device ran out of memory at `step`, naming the default that chose."""
    training = check_training_keys(recipe.training, "<recipe>")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lines = [f"out of memory while training, at step {step} ({first})"]
    if not sft_args.activation_checkpointing and "activation_checkpointing" not in training:
        share = UNCHECKPOINTED_SHARE["cuda" if sft_args.device.type == "cuda" else "cpu"]
        lines += [
            "activation checkpointing was off: this stack turns it off by default where the memory "
            f"estimator's peak without it is within {share:.0%} of the memory the run can use, and here "
            "the estimate fell short (or another process took memory since).",
            "Run again with --set training.activation_checkpointing=true (make train: SET=...; about a "
            "third slower, a fraction of the memory); the run resumes from its newest complete checkpoint.",
        ]
    else:
        lines.append(
            "Lower training.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
            "rows per optimizer step) or data.max_length; `python -m training estimate --recipe R "
            "--card NAME` shows what fits."
        )
    return "\n  ".join(lines)
