"""Several processes, one run: who is who, waiting for each other, agreeing, and the strategy's settings.

A launcher (`accelerate launch`, torchrun underneath) starts one process per GPU and tells each
its place in the environment: RANK (0 .. WORLD_SIZE-1 over all machines), LOCAL_RANK (its GPU on
this machine), LOCAL_WORLD_SIZE. Without them there is one process, rank 0, and every helper
here does nothing. The process group itself is set up by transformers when the trainer
arguments are built, so these helpers are usable from then on.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from training.errors import AnotherProcessStopped, RecipeError
from training.recipe import DistributedSection, Recipe

SHIPPED_DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed"
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several_machines(self) -> bool:
        return self.world_size > self.local_world_size

    def as_dict(self) -> dict:
        return {"world_size": self.world_size, "processes_per_machine": self.local_world_size}


def ranks() -> Ranks:
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return Ranks(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=world,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
    )


def under_launcher() -> bool:
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def _group_ready() -> bool:

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every process of the run is here. A process that stopped instead (a full disk at a
    save, say, with its error printed) ends the wait with an error from the backend (gloo: the
    connection closed by the peer; NCCL: the remote process gone), which stops this one too."""
    if not _group_ready():
        return
    try:
        dist.barrier()
    except RuntimeError as e:  # DistBackendError and DistNetworkError are RuntimeErrors too
        reason = _first_sentence(str(e)) or type(e).__name__
        raise AnotherProcessStopped(
            f"another process of this run stopped while this one waited for it ({reason}); "
            "that process's error says why"
        ) from None


def _first_sentence(message: str) -> str:
    """gloo's 'Connection closed by peer [ADDR]', without its source location and its advice."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", message.strip().splitlines()[0] if message.strip() else "")
    return text.split(". ")[0].rstrip(".")


def from_main(value: Any) -> Any:
    """Rank 0's value on every rank (pickled; for small things like a path)."""
    if not _group_ready():
        return value

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(value: Any) -> list[Any]:
    if not _group_ready():
        return [value]

    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, value)
    return found


def max_over_ranks(value: int, device) -> int:
    """The largest of every rank's integer: one tiny all-reduce (on the GPU under NCCL)."""
    if not _group_ready():
        return value

    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


# ---------------------------------------------------------------------------------------
# The strategy's settings: what reaches TrainingArguments and the model loader


def deepspeed_config_path(section: DistributedSection, source: str) -> Path:
    name = section.deepspeed.config
    shipped = SHIPPED_DEEPSPEED_CONFIGS / f"{name}.json"
    path = shipped if shipped.is_file() else Path(name)
    if not path.is_file():
        known = sorted(p.stem for p in SHIPPED_DEEPSPEED_CONFIGS.glob("*.json"))
        raise RecipeError(
            f"{source}: distributed.deepspeed.config {name!r} is neither a shipped config "
            f"({', '.join(known)}) nor a JSON file"
        )
    return path


def deepspeed_config(section: DistributedSection, source: str) -> dict:
    path = deepspeed_config_path(section, source)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecipeError(f"{source}: distributed.deepspeed.config {path} is not valid JSON: {e}") from None
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise RecipeError(f"{source}: {path}: zero_optimization.stage must be 0, 1, 2 or 3, not {stage!r}")
    return config


def zero_stage(recipe: Recipe, source: str = "<recipe>") -> int | None:
    if recipe.distributed.strategy != "deepspeed":
        return None
    return int(deepspeed_config(recipe.distributed, source).get("zero_optimization", {}).get("stage", 0))


def shards_weights(recipe: Recipe, source: str = "<recipe>") -> bool:
    """FSDP and ZeRO-3 split the model's weights across GPUs; DDP and ZeRO-0/1/2 keep a whole copy on each."""
    return recipe.distributed.strategy == "fsdp" or zero_stage(recipe, source) == 3


def apply_strategy(args: dict[str, Any], recipe: Recipe, device_type: str, source: str) -> dict[str, Any]:
    """Add the strategy's TrainingArguments to SFTConfig's arguments (the Trainer reads them from there).

    The launcher only starts the processes; FSDP and DeepSpeed are configured here, where the
    Trainer builds its Accelerator from them, so a run launched by hand with torchrun or
    `accelerate launch` gets the same settings.
    """
    section = recipe.distributed
    strategy = section.strategy
    if device_type == "cpu":
        # Without this, a process started by a launcher on a machine without GPUs finds no device and
        # does not join the process group; with it, transformers uses the gloo backend.
        args["use_cpu"] = True
    if strategy == "none":
        return args
    if strategy in ("fsdp", "deepspeed"):
        optim = str(args["optim"])
        if optim.startswith("paged_"):
            if "optim" in recipe.training and strategy == "fsdp":
                raise RecipeError(
                    f"{source}: training.optim {optim} cannot run under FSDP: FSDP shards the LoRA weights "
                    "(as DTensors), which bitsandbytes' optimizers do not handle; FSDP shards the optimizer "
                    "state itself. Remove training.optim (default adamw_torch) or use adamw_torch_fused."
                )
            if "optim" not in recipe.training:
                # Paging exists to spill one GPU's optimizer state; sharding already divides it.
                args["optim"] = "adamw_torch"
    if strategy == "ddp":
        # Every LoRA weight gets a gradient in every step, and searching for unused parameters
        # breaks activation checkpointing.
        args.setdefault("ddp_find_unused_parameters", False)
    elif strategy == "fsdp":
        args["fsdp"] = True
        args["fsdp_config"] = _fsdp_config(args, section, source)
    elif strategy == "deepspeed":
        deepspeed_config(section, source)  # readable, with a known stage
        args["deepspeed"] = str(deepspeed_config_path(section, source))
    return args


def _fsdp_config(args: dict[str, Any], section: DistributedSection, source: str) -> dict[str, Any]:
    # transformers: with FSDP, prefer FSDP's own activation checkpointing (it wraps each decoder
    # layer) over the training argument, which adds an all-gather per layer in the backward pass.
    # The two must not both be on, so the recipe's setting moves over.
    checkpointing = bool(args.get("activation_checkpointing", True))
    kwargs = dict(args.pop("activation_checkpointing_kwargs", None) or {})
    kwargs.pop("use_reentrant", None)  # FSDP's checkpoint wrapper is non-reentrant
    if checkpointing and kwargs:
        raise RecipeError(
            f"{source}: training.activation_checkpointing_kwargs {sorted(kwargs)} do not apply with "
            "distributed.strategy fsdp, which checkpoints every decoder layer with FSDP's own wrapper"
        )
    args["activation_checkpointing"] = False
    return {
        "version": 2,
        "cpu_offload": section.fsdp.cpu_offload,
        "reshard_after_forward": section.fsdp.reshard_after_forward,
        "activation_checkpointing": checkpointing,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one FSDP unit per decoder layer
        # The adapter is small: gathered whole on rank 0 it saves as a plain peft checkpoint.
        "state_dict_type": "FULL_STATE_DICT",
    }


def process_group_environment(recipe: Recipe) -> dict[str, str]:
    """Variables to set before the process group starts (before the trainer arguments are built).

    accelerate gives the process group a gloo side for CPU tensors ("cuda:nccl,cpu:gloo") only
    when these variables say FSDP offloads to or gathers on the CPU, which the offloaded
    optimizer step and the full state dict of a checkpoint both do. They say what the
    TrainingArguments built from the same recipe say.
    """
    if recipe.distributed.strategy != "fsdp":
        return {}
    return {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_OFFLOAD_PARAMS": str(recipe.distributed.fsdp.cpu_offload).lower(),
        "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    }
