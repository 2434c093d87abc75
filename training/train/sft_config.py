"""The recipe's `training` section becomes TRL's SFTConfig, checked by it before anything loads.

Keys pass through to SFTConfig unchanged, so every TRL/transformers option works without
being re-declared here. Values are type-checked against SFTConfig's own annotations (a
YAML `learning_rate: 2e-4` is a string, and is converted), and keys that other recipe
sections own are refused with a pointer to the right place.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError
from trl import SFTConfig

from training.errors import RecipeError
from training.model.loading import Device
from training.recipe import Recipe
from training.train.distributed import apply_strategy
from training.train.hardware import check_hardware

# Keys set from other sections of the recipe, or by the stack itself.
OWNED_ELSEWHERE = {
    "output_dir": "output.dir and output.run_name",
    "max_length": "data.max_length",
    "packing": "data.packing",
    "completion_only_loss": "data.completion_only_loss",
    "assistant_only_loss": "data.completion_only_loss",
    "dataset_text_field": "data.text_field",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "model_init_kwargs": "the model section",
    "trust_remote_code": "model.trust_remote_code",
    "chat_template_path": "data.template",
    "resume_from_checkpoint": "re-running the same recipe (it resumes by itself)",
    "overwrite_output_dir": "the --force flag",
}

# Keys that older TRL/transformers versions (and the tutorials written for them) used.
RENAMED = {
    "warmup_ratio": "warmup_steps (a value below 1 is a fraction of all steps, e.g. 0.03)",
    "max_seq_length": "data.max_length",
    "evaluation_strategy": "eval_strategy",
    "dataset_batch_size": "nothing (TRL removed it)",
    "neftune_noise_alpha": "nothing (TRL removed it)",
}

DEPRECATED_ALIASES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}

# Settings users may change when re-running an interrupted run: they do not change what
# the checkpoint means.
RESUMABLE_CHANGES = {
    "max_steps",
    "num_train_epochs",
    "logging_steps",
    "save_steps",
    "eval_steps",
    "save_total_limit",
    "report_to",
    "disable_tqdm",
    "dataloader_num_workers",
}


class Range(typing.NamedTuple):
    ok: typing.Callable[[float], bool]
    allowed: str
    # When the setting counts: num_train_epochs is unused while max_steps is set.
    applies: typing.Callable[[dict[str, Any]], bool] = lambda training: True


def _steps(value: float) -> bool:
    # transformers reads a value below 1 as a fraction of all steps, and refuses 1.5.
    return 0 <= value < 1 or (value >= 1 and float(value).is_integer())


_STEPS = "a whole number of steps, or a fraction of all steps below 1"

# The numeric settings recipes commonly set, with the values transformers, TRL and torch accept.
# SFTConfig checks few of them itself: the others passed `validate` and failed in `train`, after the
# model and data had loaded, with a traceback from inside the Trainer or the optimizer (a batch size
# of 0), or trained nothing and reported success (num_train_epochs: 0). Sources: TrainingArguments'
# documentation and __post_init__, Trainer.set_initial_training_values (max_steps below 0 means
# epochs), DefaultFlowCallback (eval_steps 0 falls back to logging_steps, save_steps 0 saves only
# at the end), the AdamW of torch and bitsandbytes (lr, betas, eps, weight decay) and numpy's seed.
RANGES: dict[str, Range] = {
    "per_device_train_batch_size": Range(lambda v: v >= 1, "1 or more"),
    "per_device_eval_batch_size": Range(lambda v: v >= 1, "1 or more"),
    "gradient_accumulation_steps": Range(lambda v: v >= 1, "1 or more"),
    "num_train_epochs": Range(
        lambda v: v > 0,
        "more than 0 (a fraction trains part of the last epoch), or set max_steps instead",
        applies=lambda training: training.get("max_steps", -1) <= 0,
    ),
    "max_steps": Range(lambda v: v == -1 or v >= 1, "1 or more, or -1 to train num_train_epochs"),
    "learning_rate": Range(lambda v: v >= 0, "0 or more"),
    "weight_decay": Range(lambda v: v >= 0, "0 or more"),
    "adam_beta1": Range(lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "adam_beta2": Range(lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "adam_epsilon": Range(lambda v: v >= 0, "0 or more"),
    # The share of the loss taken off the target token: above 1 (or below 0) it trains away from it.
    "label_smoothing_factor": Range(lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "warmup_steps": Range(lambda v: v >= 0, "0 or more (below 1: a fraction of all steps)"),
    "logging_steps": Range(lambda v: v > 0 and _steps(v), f"more than 0: {_STEPS}"),
    "eval_steps": Range(_steps, f"{_STEPS} (0: every logging_steps)"),
    "save_steps": Range(_steps, f"{_STEPS} (0: only at the end)"),
    "dataloader_num_workers": Range(lambda v: v >= 0, "0 or more"),
    "eval_accumulation_steps": Range(lambda v: v >= 1, "1 or more (unset: keep every eval batch in memory)"),
    "seed": Range(lambda v: 0 <= v < 2**32, "from 0 to 2**32 - 1"),
    "data_seed": Range(lambda v: 0 <= v < 2**32, "from 0 to 2**32 - 1"),
}


@functools.cache
def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(SFTConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(SFTConfig) if f.init}


def check_training_keys(training: dict[str, Any], source: str) -> dict[str, Any]:
    """Type-check the recipe's training section; return it with values converted."""
    types = _field_types()
    checked, problems = {}, []
    for key, value in training.items():
        if key in OWNED_ELSEWHERE:
            problems.append(f"training.{key}: set by {OWNED_ELSEWHERE[key]}, not in the training section")
            continue
        if key in RENAMED and key not in types:
            problems.append(f"training.{key}: no longer exists; use {RENAMED[key]}")
            continue
        if key not in types:
            hint = difflib.get_close_matches(key, list(types), n=1)
            more = f" (did you mean '{hint[0]}'?)" if hint else ""
            problems.append(
                f"training.{key}: not an option of TRL's SFTConfig or transformers' TrainingArguments{more}"
            )
            continue
        try:
            checked[key] = _validate(types[key], value)
        except ValidationError as e:
            problem = e.errors()[0]["msg"]
            problems.append(f"training.{key}: {problem} (got {value!r})")
            continue
        except Exception:  # noqa: BLE001 - an annotation pydantic cannot check: let SFTConfig judge
            checked[key] = value
        # A str field with documented choices (train_sampling_strategy, ...): transformers itself
        # falls back to its default for a value it does not know, silently.
        allowed = choices(key)
        if allowed and isinstance(checked[key], str) and checked[key] not in allowed:
            problems.append(f"training.{key}: {checked[key]!r} is not one of {', '.join(allowed)}")
    # transformers still accepts the old gradient_checkpointing* names, but only where the new
    # activation_checkpointing* ones are unset, and this stack sets those by default: the old name
    # (in most tutorials) would be silently ignored. It is moved over instead.
    for old, new in DEPRECATED_ALIASES.items():
        if old in checked and new in checked:
            problems.append(f"training.{old} and training.{new} are the same setting; keep only {new}")
        elif old in checked:
            checked[new] = checked.pop(old)
    problems += _out_of_range(checked)
    if problems:
        raise RecipeError(f"{source}: invalid recipe\n  " + "\n  ".join(problems))
    return checked


def _out_of_range(training: dict[str, Any]) -> list[str]:
    """The type-checked settings with values the Trainer or the optimizer would refuse or misread."""
    return [
        f"training.{key}: must be {rule.allowed} (got {value!r})"
        for key, rule in RANGES.items()
        if isinstance(value := training.get(key), (int, float))
        and not isinstance(value, bool)
        and not rule.ok(value)
        and rule.applies(training)
    ]


def choices(key: str) -> list[str]:
    """The values transformers' TrainingArguments (or TRL's SFTConfig) documents for `key`, if it lists them."""
    return _field_choices().get(key, [])


@functools.cache
def _field_choices() -> dict[str, list[str]]:
    return {f.name: [str(c) for c in f.metadata.get("choices", [])] for f in dataclasses.fields(SFTConfig)}


def _validate(annotation: Any, value: Any) -> Any:
    adapter = TypeAdapter(annotation)
    try:
        return adapter.validate_python(value)
    except ValidationError:
        if not isinstance(value, bool):
            raise
        # YAML 1.1 reads `eval_strategy: no` as False; a field that takes words, not
        # booleans, gets the word back.
        return adapter.validate_python("no" if value is False else "yes")


def build_sft_config(recipe: Recipe, device: Device, dtype_name: str, source: str = "<recipe>") -> SFTConfig:
    """SFTConfig for this recipe on this machine. Under a launcher this also joins the process group."""
    args = sft_kwargs(recipe, device, dtype_name, source)
    check_hardware(recipe, args, cuda=device.type == "cuda", source=source)
    try:
        return SFTConfig(**args)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{source}: training: TRL's SFTConfig rejects these settings: {e}") from None


def check_before_launch(recipe: Recipe, source: str, *, cuda: bool) -> None:
    """What build_sft_config refuses, checked in the process that only starts and waits for the others.

    SFTConfig is built for the CPU here: building it for a GPU would open a CUDA context on GPU 0
    in a process that trains nothing. The training processes build it again for their GPU.
    """
    if cuda:
        device, dtype_name = (
            Device("cuda", "GPU", 1, True),
            "float16" if recipe.model.dtype == "float16" else "bfloat16",
        )
    else:
        device, dtype_name = Device("cpu", "cpu", 1, False), "float32"
    args = sft_kwargs(recipe, device, dtype_name, source)
    check_hardware(recipe, args, cuda=cuda, source=source)
    try:
        SFTConfig(**{**args, "use_cpu": True, "bf16": False, "fp16": False})
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{source}: training: TRL's SFTConfig rejects these settings: {e}") from None


def sft_kwargs(recipe: Recipe, device: Device, dtype_name: str, source: str = "<recipe>") -> dict[str, Any]:
    """SFTConfig's arguments for this recipe on this device (SFTConfig itself checks the hardware)."""
    training = check_training_keys(recipe.training, source)
    run_dir = recipe.output.run_dir()
    on_gpu = device.type == "cuda"
    args: dict[str, Any] = {
        # Defaults for a QLoRA run; any of them can be overridden in the recipe.
        "report_to": "none",
        "optim": "paged_adamw_32bit" if on_gpu else "adamw_torch",
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 100,
        "include_num_input_tokens_seen": "non_padding",
        "seed": 42,
        "dataloader_pin_memory": on_gpu,  # pinning needs an accelerator; on the CPU it only warns
        # Every padded position costs as much as a data token: batches of rows of similar length
        # (random groups of up to 50 batches, sorted within; the longest batch first, so that a run short
        # of memory fails at once) cut the quickstart's padding by a third, and the padded slots of
        # the 7B bench's rows of 64-2048 tokens by half. Same rows per epoch and per step, same loss
        # per batch; only which rows share a batch changes. The QLoRA paper's own script does the same.
        "train_sampling_strategy": "group_by_length",
        "run_name": recipe.output.run_name,
        **training,
        # Owned by other sections.
        "output_dir": str(run_dir / "checkpoints"),
        # Unpacked padding-free batches: this stack's data preparation already truncated every row
        # to max_length, and TRL refuses them while max_length is set (it would not truncate them).
        "max_length": None
        if training.get("padding_free") and not recipe.data.packing
        else recipe.data.max_length,
        "packing": recipe.data.packing,
        "completion_only_loss": recipe.data.loss_on_completion_only,
        "bf16": dtype_name == "bfloat16",
        "fp16": dtype_name == "float16",
        # The stack rotates checkpoints itself, only after the newest is complete.
        "save_total_limit": None,
        "save_only_model": False,
    }
    if training.get("save_only_model"):
        raise RecipeError(
            f"{source}: training.save_only_model would make runs impossible to resume; remove it"
        )
    if not on_gpu and str(args["optim"]).startswith("paged_"):
        # Paged optimizers page GPU memory to the host; on the CPU the plain AdamW is the same thing.
        args["optim"] = "adamw_torch"
    if recipe.data.validation is not None:
        args.setdefault("eval_strategy", args["save_strategy"])
        args.setdefault("eval_on_start", True)  # the starting loss, to show what training changed
        if args["eval_strategy"] == "steps":
            args.setdefault("eval_steps", args["save_steps"])
    elif training.get("eval_strategy", "no") != "no":
        raise RecipeError(f"{source}: training.eval_strategy is set but data.validation is not")
    return apply_strategy(args, recipe, device.type, source)


def save_total_limit(recipe: Recipe) -> int | None:
    return recipe.training.get("save_total_limit", 3)
