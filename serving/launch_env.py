"""Launch settings for the GPU servers, derived from the merged model and its recipe, checked before start.

compose.yaml holds the TGI and vLLM command lines; the values that depend on the model
(per-request token limits, number of shards, dtype) come from here, as environment
variables that compose interpolates. `make serve` computes them inside the project's
image, where the outputs volume is mounted, so a wrong setting fails in seconds with a
message instead of after minutes of model loading on the GPUs. What differs between the
servers (TGI's dtype and readiness rules, its multi-LoRA) is the backend's to say.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from serving.backends import get_backend
from serving.backends.base import LaunchError, LaunchSettings, check_num_shard, split_limits
from serving.backends.llamacpp import DEFAULT_QUANT, gguf_path
from serving.backends.vllm import choose_tool_call_parser
from serving.model_dir import ModelDir, ModelDirError, read_chat_template

GPU_BACKENDS = ("tgi", "vllm")
LAUNCHED = (*GPU_BACKENDS, "llamacpp")  # backends `make serve` starts with compose
# Settings that a `KEY=` line in .env would pass to TGI (API_KEY: also llama.cpp) as an empty value,
# which it reads as a setting.
NOT_EMPTY = ("API_KEY", "QUANTIZE", "DTYPE", "LORA_ADAPTERS")


def gpu_count() -> int:
    """NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES narrows it), 0 without any."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "void"):
        return 0
    found = 0
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
            )
            found = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.TimeoutExpired):
            found = 0
    if visible and visible.strip() not in ("all",):
        return min(found, len([d for d in visible.split(",") if d.strip()])) if found else 0
    return found


def shell(settings: LaunchSettings) -> str:
    """`export KEY=value` lines for `eval` in make serve."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in settings.env().items())


def plan_merged(
    model_dir: str | Path,
    backend: str,
    *,
    num_shard: int,
    max_total_tokens: int | None = None,
    max_input_tokens: int | None = None,
    quantize: str | None = None,
    dtype: str | None = None,
    tool_calls: str | None = None,
) -> LaunchSettings:
    """Settings to serve a merged model with TGI or vLLM, after checking it can be served so.
    `tool_calls`: vLLM's tool-call parser, 'auto' (unset: from the chat template) or 'none'."""
    if backend not in GPU_BACKENDS:
        raise LaunchError(f"unknown GPU backend {backend!r}; choose one of: {', '.join(GPU_BACKENDS)}")
    server = get_backend(backend)
    model = ModelDir.open(model_dir)
    total, source = model.context_length(max_total_tokens)
    if total < 2:
        raise LaunchError(f"{model.path}: a context of {total} token(s) leaves no room to generate")
    heads, kv_heads = model.attention_heads
    check_num_shard(heads, kv_heads, num_shard, server.title, f"{model.path} ({model.architecture})")
    settings = LaunchSettings(
        backend=backend,
        run=model.run_name,
        num_shard=num_shard,
        max_total_tokens=total,
        max_input_tokens=split_limits(total, max_input_tokens),
        context_source=source,
    )
    if (model.path / "adapter_config.json").is_file():
        raise LaunchError(
            f"{model.path} contains adapter_config.json: TGI takes such a directory for an adapter, not a "
            "model. A merged directory holds full weights only; merge again, or serve the adapter with "
            "LORA_ADAPTERS."
        )
    choice = {k: v for k, v in (("QUANTIZE", quantize), ("DTYPE", dtype)) if v}
    settings.dtype = server.launch_dtype(model, choice, settings.warnings)
    settings.warnings.extend(server.check_model(model, num_shard))
    if backend == "vllm":  # TGI reads tool calls with its own grammar, for any model
        settings.tool_call_parser = choose_tool_call_parser(
            tool_calls, read_chat_template(model.path), settings.notes
        )
    return settings


def plan_gguf(
    outputs: Path,
    run: str,
    quant: str,
    *,
    max_total_tokens: int | None = None,
    max_input_tokens: int | None = None,
) -> LaunchSettings:
    """Settings to serve RUN's GGUF export with llama.cpp: the merged model's limits, on the CPU."""
    path = gguf_path(outputs, run, quant)
    if not path.is_file():
        raise LaunchError(
            f"{path}: no GGUF export of '{run}' ({quant}); run `make export FORMAT=gguf QUANT={quant}` first, "
            "or set GGUF_QUANT to a type that was exported"
        )
    try:
        total, source = ModelDir.open(outputs / run / "merged").context_length(max_total_tokens)
    except ModelDirError as e:
        if max_total_tokens is None:
            raise LaunchError(f"{e}; or set MAX_TOTAL_TOKENS for the GGUF alone") from None
        total, source = max_total_tokens, "set explicitly"
    return LaunchSettings(
        backend="llamacpp",
        run=run,
        num_shard=1,
        max_total_tokens=total,
        max_input_tokens=split_limits(total, max_input_tokens),
        context_source=source,
        limits_in_env=max_total_tokens is not None,
    )


def plan_from_env(
    backend: str, *, num_shard: int | None, outputs: Path, env: dict[str, str]
) -> LaunchSettings:
    """What `make serve` runs: the settings for RUN, or for LORA_BASE_MODEL + LORA_ADAPTERS."""
    shards = num_shard if num_shard is not None else (_int_setting(env, "NUM_SHARD") or gpu_count() or 1)
    total = _int_setting(env, "MAX_TOTAL_TOKENS")
    max_input = _int_setting(env, "MAX_INPUT_TOKENS")
    if backend in ("tgi", "llamacpp"):
        # llama.cpp's server reads only API_KEY of these, and an empty one as a key nobody can send.
        keys = NOT_EMPTY if backend == "tgi" else ("API_KEY",)
        empty = [k for k in keys if k in env and not env[k].strip()]
        if empty:
            raise LaunchError(
                f"{', '.join(empty)} set but empty (a `KEY=` line in .env?): {get_backend(backend).title} "
                "reads an empty value as a setting and refuses to start, or with API_KEY, locks every client "
                "out. Remove or comment out the line."
            )
    if backend == "llamacpp":
        return plan_gguf(
            outputs,
            env.get("RUN") or "quickstart",
            env.get("GGUF_QUANT") or DEFAULT_QUANT,
            max_total_tokens=total,
            max_input_tokens=max_input,
        )
    base, adapters = env.get("LORA_BASE_MODEL"), env.get("LORA_ADAPTERS")
    if bool(base) != bool(adapters):
        raise LaunchError(
            "multi-LoRA serving needs both LORA_BASE_MODEL (the base model id) and LORA_ADAPTERS "
            "(name=/outputs/<run>/adapter,...); set both, or neither to serve the merged model"
        )
    if base and adapters:
        return get_backend(backend).plan_adapters(
            base,
            adapters,
            num_shard=shards,
            outputs=outputs,
            max_total_tokens=total,
            max_input_tokens=max_input,
        )
    run = env.get("RUN") or "quickstart"
    try:
        return plan_merged(
            outputs / run / "merged",
            backend,
            num_shard=shards,
            max_total_tokens=total,
            max_input_tokens=max_input,
            quantize=env.get("QUANTIZE") or None,
            dtype=env.get("DTYPE") or None,
            tool_calls=env.get("TOOL_CALL_PARSER") or None,
        )
    except ModelDirError as e:
        raise LaunchError(f"{e} (RUN={run})") from None


def _int_setting(env: dict[str, str], name: str) -> int | None:
    value = (env.get(name) or "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name} must be a whole number, got {value!r}") from None
