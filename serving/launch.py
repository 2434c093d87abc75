"""Launch settings for the GPU servers, derived from the merged model and its recipe, checked before start.

compose.yaml holds the TGI and vLLM command lines; the values that depend on the model
(per-request token limits, number of shards, dtype) come from here, as environment
variables that compose interpolates. `make serve` computes them inside the project's
image, where the outputs volume is mounted, so a wrong setting fails in seconds with a
message instead of after minutes of model loading on the GPUs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from serving.errors import ServingError
from serving.model_dir import ModelDir, ModelDirError, _read_json
from training.serving_check import check_serving

GPU_BACKENDS = ("tgi", "vllm")
CONTAINER_OUTPUTS = PurePosixPath("/outputs")

# `--quantize` values of the TGI 3.3.7 launcher (docs/source/reference/launcher.md).
TGI_QUANTIZE = (
    "awq",
    "compressed-tensors",
    "eetq",
    "exl2",
    "gptq",
    "marlin",
    "bitsandbytes",
    "bitsandbytes-nf4",
    "bitsandbytes-fp4",
    "fp8",
)
# Architectures whose TGI modeling applies LoRA adapters per request (TensorParallelMultiAdapterLinear
# in custom_modeling/flash_{llama,mistral,qwen2,gemma2,gemma3,starcoder2}_modeling.py; phi3 and
# granite run on FlashLlama). For any other, TGI loads LORA_ADAPTERS but answers with the base.
TGI_MULTI_LORA = frozenset(
    ["llama", "phi3", "granite", "mistral", "qwen2", "gemma2", "gemma3", "gemma3_text", "starcoder2"]
)
TGI_LORA_TARGETS = frozenset(
    [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "qkv_proj",
        "c_attn",
        "c_proj",
        "c_fc",
    ]
)


class LaunchError(ServingError):
    """A setting that would make the server fail to start or serve the wrong thing."""


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


@dataclass
class LaunchSettings:
    backend: str
    run: str
    num_shard: int
    max_total_tokens: int
    max_input_tokens: int
    context_source: str
    dtype: str | None = None
    warnings: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The variables compose.yaml interpolates for this backend."""
        env = {
            "RUN": self.run,
            "NUM_SHARD": str(self.num_shard),
            "MAX_INPUT_TOKENS": str(self.max_input_tokens),
            "MAX_TOTAL_TOKENS": str(self.max_total_tokens),
        }
        if self.dtype:
            env["DTYPE"] = self.dtype
        return env

    def shell(self) -> str:
        return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in self.env().items())


def check_num_shard(heads: int | None, kv_heads: int | None, num_shard: int, backend: str, what: str) -> None:
    if num_shard < 1:
        raise LaunchError(f"NUM_SHARD must be >= 1 (the number of GPUs to shard over), got {num_shard}")
    if num_shard == 1 or heads is None:
        return
    bad = [
        f"{n} {name}"
        for n, name in ((heads, "attention heads"), (kv_heads, "key/value heads"))
        if n and n % num_shard
    ]
    if bad:
        ok = [n for n in range(1, num_shard + 1) if heads % n == 0 and (not kv_heads or kv_heads % n == 0)]
        server = "TGI" if backend == "tgi" else "vLLM"
        raise LaunchError(
            f"{what}: {' and '.join(bad)} do not divide over {num_shard} GPUs, which {server}'s tensor "
            f"parallelism needs; set NUM_SHARD to one of {', '.join(map(str, ok))}"
        )


def _split_limits(total: int, max_input: int | None) -> int:
    if max_input is None:
        return total - 1  # TGI's own convention: any prompt that leaves room for one new token
    if not 0 < max_input < total:
        raise LaunchError(
            f"MAX_INPUT_TOKENS must be in [1, {total - 1}] (below MAX_TOTAL_TOKENS={total}), got {max_input}"
        )
    return max_input


def plan_merged(
    model_dir: str | Path,
    backend: str,
    *,
    num_shard: int,
    max_total_tokens: int | None = None,
    max_input_tokens: int | None = None,
    quantize: str | None = None,
    dtype: str | None = None,
) -> LaunchSettings:
    """Settings to serve a merged model with TGI or vLLM, after checking it can be served so."""
    if backend not in GPU_BACKENDS:
        raise LaunchError(f"unknown GPU backend {backend!r}; choose one of: {', '.join(GPU_BACKENDS)}")
    model = ModelDir.open(model_dir)
    total, source = model.context_length(max_total_tokens)
    if total < 2:
        raise LaunchError(f"{model.path}: a context of {total} token(s) leaves no room to generate")
    heads, kv_heads = model.attention_heads
    check_num_shard(heads, kv_heads, num_shard, backend, f"{model.path} ({model.architecture})")
    settings = LaunchSettings(
        backend=backend,
        run=model.run_name,
        num_shard=num_shard,
        max_total_tokens=total,
        max_input_tokens=_split_limits(total, max_input_tokens),
        context_source=source,
    )
    if (model.path / "adapter_config.json").is_file():
        raise LaunchError(
            f"{model.path} contains adapter_config.json: TGI takes such a directory for an adapter, not a "
            "model. A merged directory holds full weights only; merge again, or serve the adapter with "
            "LORA_ADAPTERS."
        )
    if backend == "tgi":
        settings.dtype = _tgi_dtype(model, quantize, dtype, settings.warnings)
        _check_tgi(model, num_shard, settings.warnings)
    elif quantize:
        raise LaunchError(
            "QUANTIZE applies to TGI only; vLLM reads the quantization of pre-quantized checkpoints "
            "from their config. Unset QUANTIZE, or serve with SERVE_BACKEND=tgi."
        )
    return settings


def _tgi_dtype(model: ModelDir, quantize: str | None, dtype: str | None, warnings: list[str]) -> str | None:
    if quantize is not None and quantize not in TGI_QUANTIZE:
        raise LaunchError(
            f"QUANTIZE={quantize!r} is not a TGI 3.3.7 method; choose one of: {', '.join(TGI_QUANTIZE)}"
        )
    if quantize and dtype:
        raise LaunchError("TGI does not combine --dtype with --quantize: unset DTYPE or QUANTIZE")
    if dtype:
        if dtype not in ("float16", "bfloat16"):
            raise LaunchError(f"DTYPE={dtype!r}: TGI loads float16 or bfloat16 only")
        return dtype
    if quantize:
        return None
    # TGI does not read the dtype from config.json and loads most models in float16.
    if model.dtype == "bfloat16":
        return "bfloat16"
    if model.dtype == "float32":
        warnings.append(
            f"{model.path} is float32; TGI serves it in float16 (merge with merge.dtype: bfloat16 to choose)"
        )
    return None


def _check_tgi(model: ModelDir, num_shard: int, warnings: list[str]) -> None:
    """Everything TGI 3.3.7 fails on at start-up: the checks the merge step runs too."""
    report = check_serving(model.path, num_shard)
    failed = [c for c in report.checks if c.status == "fail"]
    if failed:
        problems = "\n".join(f"  {c.name}: {c.detail}" for c in failed)
        raise LaunchError(f"{model.path}: TGI cannot serve this model with {num_shard} shard(s):\n{problems}")
    warnings.extend(f"{model.path}: {c.detail}" for c in report.checks if c.status == "warn")


def parse_lora_adapters(spec: str) -> list[tuple[str, str | None]]:
    """LORA_ADAPTERS entries as (id, local path or None): `name=/path`, `org/repo` or `org/repo@rev`."""
    entries = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        entries.append((name.strip(), path.strip()) if sep else (item, None))
        if sep and (not name.strip() or not path.strip()):
            raise LaunchError(f"LORA_ADAPTERS entry {item!r}: write name=/outputs/<run>/adapter")
    if not entries:
        raise LaunchError("LORA_ADAPTERS is empty; list adapters as name=/outputs/<run>/adapter,...")
    return entries


def adapter_ids(spec: str | None) -> tuple[str, ...]:
    """The ids a request may name (adapter_id, or chat's model) for a LORA_ADAPTERS value."""
    return tuple(name for name, _ in parse_lora_adapters(spec)) if spec else ()


def plan_multi_lora(
    base_model: str,
    adapters: str,
    *,
    num_shard: int,
    outputs: Path = Path(CONTAINER_OUTPUTS),
    max_total_tokens: int | None = None,
    max_input_tokens: int | None = None,
) -> LaunchSettings:
    """Settings for TGI serving a base model plus LoRA adapters, unmerged."""
    entries = parse_lora_adapters(adapters)
    base_config = _base_config(base_model)
    model_type = base_config.get("model_type") if base_config else None
    if model_type is not None and model_type not in TGI_MULTI_LORA:
        raise LaunchError(
            f"TGI 3.3.7 applies LoRA adapters for {', '.join(sorted(TGI_MULTI_LORA))} only, and "
            f"{base_model} is {model_type!r}: requests would be answered by the base model. Serve the merged "
            "model instead (unset LORA_ADAPTERS and LORA_BASE_MODEL)."
        )
    warnings = []
    if base_config is None:
        warnings.append(
            f"cannot read {base_model}'s config.json here (not a directory, not in the HF cache); "
            "its architecture and head count are unchecked"
        )
    lengths = []
    for name, path in entries:
        if path is None:
            warnings.append(
                f"adapter {name} comes from the Hub; it is not checked here and needs HF_HUB_OFFLINE=0"
            )
            continue
        local = _local_path(path, outputs)
        config = _read_json(local / "adapter_config.json")
        if config is None:
            raise LaunchError(f"adapter {name}: {path} has no adapter_config.json (train the run first)")
        if config.get("use_dora"):
            raise LaunchError(
                f"adapter {name} uses DoRA, which TGI cannot apply; serve its merged model instead"
            )
        targets = config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else targets
        unknown = sorted(set(targets) - TGI_LORA_TARGETS)
        if unknown:
            warnings.append(f"adapter {name}: TGI ignores its layers on {', '.join(unknown)}")
        trained_on = config.get("base_model_name_or_path")
        if trained_on and trained_on != base_model:
            warnings.append(f"adapter {name} was trained on {trained_on}, not {base_model}")
        run = _read_json(local / "run.json") or {}
        length = ((run.get("recipe") or {}).get("data") or {}).get("max_length")
        if isinstance(length, int):
            lengths.append(length)
    heads = (base_config or {}).get("num_attention_heads")
    kv_heads = (base_config or {}).get("num_key_value_heads") or heads
    check_num_shard(heads, kv_heads, num_shard, "tgi", base_model)
    positions = (base_config or {}).get("max_position_embeddings")
    total = max_total_tokens or (min(lengths) if lengths else positions)
    if total is None:
        raise LaunchError("cannot tell the context length; set MAX_TOTAL_TOKENS")
    if positions and total > positions:
        total = positions
    source = (
        "set explicitly" if max_total_tokens else ("the adapters' recipes" if lengths else "the base model")
    )
    return LaunchSettings(
        backend="tgi",
        run=entries[0][0],
        num_shard=num_shard,
        max_total_tokens=total,
        max_input_tokens=_split_limits(total, max_input_tokens),
        context_source=source,
        warnings=warnings,
    )


def _local_path(path: str, outputs: Path) -> Path:
    posix = PurePosixPath(path)
    if posix.is_relative_to(CONTAINER_OUTPUTS):
        return outputs / posix.relative_to(CONTAINER_OUTPUTS)
    return Path(path)


def _base_config(base_model: str) -> dict | None:
    local = Path(base_model)
    if local.is_dir():
        return _read_json(local / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "config.json")
    except Exception:  # an id the cache cannot even parse: reported as unchecked
        return None
    return _read_json(Path(cached)) if isinstance(cached, str) else None


def plan_from_env(
    backend: str, *, num_shard: int | None, outputs: Path, env: dict[str, str]
) -> LaunchSettings:
    """What `make serve` runs: the settings for RUN, or for LORA_BASE_MODEL + LORA_ADAPTERS."""
    shards = num_shard if num_shard is not None else (_int_setting(env, "NUM_SHARD") or gpu_count() or 1)
    total = _int_setting(env, "MAX_TOTAL_TOKENS")
    max_input = _int_setting(env, "MAX_INPUT_TOKENS")
    if backend == "tgi":
        empty = [
            k for k in ("API_KEY", "QUANTIZE", "DTYPE", "LORA_ADAPTERS") if k in env and not env[k].strip()
        ]
        if empty:
            raise LaunchError(
                f"{', '.join(empty)} set but empty (a `KEY=` line in .env?): TGI reads an empty value as a "
                "setting and refuses to start, or with API_KEY, locks every client out. Remove or comment out "
                "the line."
            )
    base, adapters = env.get("LORA_BASE_MODEL"), env.get("LORA_ADAPTERS")
    if bool(base) != bool(adapters):
        raise LaunchError(
            "multi-LoRA serving needs both LORA_BASE_MODEL (the base model id) and LORA_ADAPTERS "
            "(name=/outputs/<run>/adapter,...); set both, or neither to serve the merged model"
        )
    if base and adapters:
        if backend != "tgi":
            raise LaunchError(
                "LORA_ADAPTERS is wired for TGI; set SERVE_BACKEND=tgi, or serve the merged model"
            )
        return plan_multi_lora(
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
