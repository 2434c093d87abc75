"""Before a run writes or downloads anything: are its model and data here, and can this machine train it?

Checked in seconds, all problems at once:

- the model and the data, when they come from the Hugging Face Hub, must be in the local
  cache or reachable: one request each, with a short timeout and no retries (the libraries
  would otherwise retry for about a minute per file before failing);
- without an NVIDIA GPU, the recipe must be trainable on this CPU. "Needs a GPU" is decided
  by two predictions from the model's config, each of which only errs on the side of letting
  a run start:
    time    one optimizer step does at least 6 floating-point operations per linear-layer
            weight per token (forward 2, input gradients 2, recomputation under activation
            checkpointing 2; 4 without it); at the speed this CPU multiplies float32 matrices,
            measured here, a step that would take more than MAX_CPU_STEP_SECONDS is refused.
            The real step is slower still (4-bit weights are dequantized, attention and the
            optimizer come on top), so the prediction is a lower bound.
    memory  the memory estimator's peak for a CPU run (python -m training estimate --device cpu)
            must fit in this machine's memory.
  `--allow-cpu` (make train ALLOW_CPU=1) starts such a run anyway.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from training.data.sources import is_local
from training.errors import RecipeError
from training.model.hub_files import cached_model_dir, dataset_cached, hub_cache, hub_offline, probe
from training.model.tiny import ARCHITECTURES, SCHEME, resolve_model_name
from training.recipe import Recipe
from training.train.estimate import activation_checkpointing_default, estimate, human, physical_memory
from training.train.sft_config import check_training_keys

log = logging.getLogger(__name__)

# A run of a few hundred steps at this pace already takes a working day on the CPU.
MAX_CPU_STEP_SECONDS = 60.0
ALLOW_CPU_HINT = "To train on this CPU anyway: --allow-cpu (make train ALLOW_CPU=1)."


def preflight(recipe: Recipe, source: str, *, cuda: bool, allow_cpu: bool = False) -> None:
    """Refuse, with every reason at once, a run that cannot start or finish here."""
    model = model_problems(recipe)
    problems = model + data_problems(recipe)
    if not cuda:
        if model:  # no config.json to judge the model by
            problems.append(
                f"this machine has no NVIDIA GPU (CUDA) either; whether {recipe.model.name} can train on "
                "its CPU is judged from the model's config.json once that is available"
            )
        else:
            slow = cpu_problems(recipe)
            if slow and allow_cpu:
                for problem in slow:
                    log.warning("--allow-cpu: training on the CPU although %s", problem)
            elif slow:
                problems += [
                    "this recipe needs an NVIDIA GPU (CUDA), and this machine has none:",
                    *(f"  {p}" for p in slow),
                    ALLOW_CPU_HINT,
                ]
    if problems:
        raise RecipeError(f"{source}: this recipe cannot run here\n  " + "\n  ".join(problems))


def model_problems(recipe: Recipe, *, hub: bool = True) -> list[str]:
    """The model must be a tiny one, a local directory, in the Hugging Face cache, or on the Hub
    (`hub`: asked, with one short request; otherwise only what can be checked here)."""
    model = recipe.model
    if model.name.startswith(SCHEME):
        if model.name.removeprefix(SCHEME) in ARCHITECTURES:
            return []
        available = ", ".join(SCHEME + a for a in ARCHITECTURES)
        return [f"model.name {model.name}: no such tiny model; available: {available}"]
    if Path(model.name).expanduser().is_dir():
        return []
    if model.name.startswith(("/", ".", "~")):
        return [f"model.name {model.name}: no such directory"]
    if not hub:
        return []
    cached = cached_model_dir(model.name, model.revision) is not None
    return _hub_problems("model", model.name, model.revision, cached, "a local model directory")


def data_problems(recipe: Recipe, *, hub: bool = True) -> list[str]:
    """The data must be a local file, in the Hugging Face cache, or on the Hub (as model_problems)."""
    data = recipe.data
    if is_local(data.source):
        return [] if Path(data.source).is_file() else [f"data.source {data.source}: data file not found"]
    if not hub:
        return []
    cached = dataset_cached(data.source, data.revision)
    return _hub_problems("dataset", data.source, data.revision, cached, "a local .jsonl file")


def _hub_problems(kind: str, repo: str, revision: str | None, cached: bool, local: str) -> list[str]:
    key = "model.name" if kind == "model" else "data.source"
    where = f"the Hugging Face cache ({hub_cache()})"
    if hub_offline():
        if cached:
            return []
        return [f"{key} {repo}: not in {where}, and HF_HUB_OFFLINE=1 forbids downloading it"]
    found = probe(repo, kind, revision)
    if found.ok:
        return []
    if found.reachable:
        return [f"{key} {repo}: {found.reason}"]
    if cached:
        return [
            f"{key} {repo}: {found.reason}; it is in {where}: set HF_HUB_OFFLINE=1 to train from that copy"
        ]
    return [
        f"{key} {repo}: {found.reason}, and it is not in {where}. Download it once where the Hub is "
        f"reachable, or set {key} to {local}"
    ]


def cpu_problems(recipe: Recipe) -> list[str]:
    """Why this recipe cannot sensibly train on this machine's CPU (empty: it can)."""
    config = AutoConfig.from_pretrained(
        resolve_model_name(recipe.model.name),
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    training = check_training_keys(recipe.training, "<recipe>")
    batch = int(training.get("per_device_train_batch_size", 8))
    accumulation = int(training.get("gradient_accumulation_steps", 1))
    tokens = batch * accumulation * recipe.data.max_length
    weights = linear_weights(config, recipe.model.trust_remote_code)
    per_weight = 6 if activation_checkpointing_default(recipe, config, device="cpu") else 4
    rate = matmul_flops_per_second()
    seconds = per_weight * weights * tokens / rate
    problems = []
    if seconds > MAX_CPU_STEP_SECONDS:
        problems.append(
            f"one optimizer step ({batch} x {accumulation} x {recipe.data.max_length} tokens through "
            f"{weights / 1e9:.2f} billion linear-layer weights, {per_weight} operations per weight and "
            f"token) would take at least {_duration(seconds)} on this CPU, which multiplies float32 "
            f"matrices at {rate / 1e9:.0f} GFLOP/s (measured just now); the limit is "
            f"{MAX_CPU_STEP_SECONDS:.0f} s"
        )
    try:
        peak = estimate(recipe, config, device="cpu").total
    except RecipeError:  # an architecture the estimator does not know: the time alone decides
        peak = None
    memory = physical_memory()
    if peak is not None and memory and peak > memory:
        problems.append(
            f"training on the CPU needs about {human(peak)} for its tensors (python -m training estimate "
            f"--device cpu), and this machine has {human(memory)} of memory"
        )
    return problems


def linear_weights(config, trust_remote_code: bool = False) -> int:
    """Weights of the model's linear layers (output head included), counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@functools.cache
def matmul_flops_per_second(n: int = 1024, repeats: int = 3) -> float:
    """This CPU's float32 matrix product speed with the threads torch uses (about 0.1 s to measure)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # the first product pays for thread start-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"
