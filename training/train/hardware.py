"""What a recipe asks of the machine (GPUs, kernels, packages), checked before anything loads.

Each problem is reported with what the setting needs and what to change, instead of an
import error or a CUDA failure minutes into a run.
"""

from __future__ import annotations

import importlib.util

from training.errors import RecipeError
from training.recipe import Recipe

FLASH_ATTENTION = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def liger_supports(model_type: str) -> bool:
    """Whether liger-kernel is installed and has kernels for this architecture (its own table)."""
    if not installed("liger_kernel"):
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # noqa: BLE001 - a broken install (e.g. no Triton) means no kernels, not a crash
        return False
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def hardware_problems(recipe: Recipe, training: dict, *, cuda: bool) -> list[str]:
    """Problems of `recipe` (with its checked `training` settings) on a machine with or without CUDA."""
    problems = []
    strategy = recipe.distributed.strategy
    if strategy in ("fsdp", "deepspeed") and not cuda:
        problems.append(
            f"distributed.strategy {strategy} needs NVIDIA GPUs (CUDA) and this machine has none: it shards "
            "through NCCL, and bitsandbytes' 4-bit weights shard only on CUDA. On the CPU, use strategy "
            "ddp with --gpus N (N processes, gloo backend)."
        )
    if strategy == "deepspeed" and not installed("deepspeed"):
        problems.append(
            "distributed.strategy deepspeed needs the deepspeed package, which is not installed: "
            "pip install 'qlora-stack[deepspeed]' (it compiles its CUDA ops on first use), or use strategy fsdp"
        )

    attention = recipe.model.attn_implementation
    if attention in FLASH_ATTENTION:
        if not cuda:
            problems.append(
                f"model.attn_implementation {attention} needs an NVIDIA GPU; use sdpa (the default) on the CPU"
            )
        elif not installed(FLASH_ATTENTION[attention]):
            problems.append(
                f"model.attn_implementation {attention} needs the {FLASH_ATTENTION[attention]} package "
                "(prebuilt wheels for your CUDA and torch versions: https://github.com/Dao-AILab/flash-attention)"
            )
    if training.get("use_liger_kernel"):
        if not cuda:
            problems.append(
                "training.use_liger_kernel needs an NVIDIA GPU (Liger's kernels are Triton kernels)"
            )
        elif not installed("liger_kernel"):
            problems.append(
                "training.use_liger_kernel needs the liger-kernel package: pip install 'qlora-stack[speed]' (or pip install liger-kernel==0.8.5)"
            )
    checkpointing = training.get("activation_checkpointing", True)
    kwargs = training.get("activation_checkpointing_kwargs") or {}
    if kwargs.get("selective") and (not checkpointing or kwargs.get("use_reentrant")):
        problems.append(
            "training.activation_checkpointing_kwargs.selective needs activation_checkpointing: true and "
            "use_reentrant: false"
        )
    if kwargs.get("offload") and not cuda:
        problems.append(
            "training.activation_checkpointing_kwargs.offload moves activations to pinned host memory, "
            "which needs a GPU; remove it on the CPU"
        )
    return problems


def hardware_notes(recipe: Recipe, training: dict, *, cuda: bool) -> list[str]:
    """Settings that work but waste the GPU: worth a line in the log, not a refusal."""
    notes = []
    batch = training.get("per_device_train_batch_size", 8)
    padding_free = recipe.data.packing or training.get("padding_free")
    if cuda and padding_free and recipe.model.attn_implementation == "eager" and batch > 1:
        notes.append(
            f"padding-free batches with eager attention: TRL flattens each batch into one sequence of {batch} x "
            f"{recipe.data.max_length} tokens and eager attention computes all of it under a block mask; "
            "sdpa (the default) and flash_attention_2 attend within each packed sequence only (less compute)"
        )
    return notes


def check_hardware(recipe: Recipe, training: dict, *, cuda: bool, source: str) -> None:
    problems = hardware_problems(recipe, training, cuda=cuda)
    if problems:
        raise RecipeError(f"{source}: this recipe cannot run here\n  " + "\n  ".join(problems))
