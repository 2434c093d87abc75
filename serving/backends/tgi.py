"""Text Generation Inference (TGI 3.3.7): GPU server with tensor parallelism and multi-LoRA.

How it differs from an OpenAI-compatible server: it describes itself on GET /info, takes
raw prompts on its own /generate (with token details), counts tokens on /tokenize and
/chat_tokenize, rejects temperature 0 and top_p 1.0 on /generate and samples whenever a
sampling knob is present there, reads any chat `model` other than its own as a LoRA
adapter id (falling back to the base model without an error), and cannot load every
merged directory (serving.backends.tgi_checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from huggingface_hub import try_to_load_from_cache

from serving.backends.base import (
    GENERATE_ROUTE,
    Backend,
    LaunchError,
    LaunchSettings,
    ServerInfo,
    check_num_shard,
    split_limits,
)
from serving.backends.tgi_checks import check_serving
from serving.errors import InvalidParameterError
from serving.model_dir import ModelDir, read_chat_template, read_json, trained_max_length
from serving.params import SamplingParams, openai_chat_fields

if TYPE_CHECKING:
    from serving.transport import Transport

IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.7"
CONTAINER_OUTPUTS = PurePosixPath("/outputs")
NO_ADAPTER = "tgi"  # TGI's chat route treats any other `model` as an adapter id

# `--quantize` values of the TGI 3.3.7 launcher (docs/source/reference/launcher.md).
QUANTIZE = (
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
MULTI_LORA = frozenset(
    ["llama", "phi3", "granite", "mistral", "qwen2", "gemma2", "gemma3", "gemma3_text", "starcoder2"]
)
LORA_TARGETS = frozenset(
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


class TGI(Backend):
    name = "tgi"
    title = "TGI"
    image = IMAGE
    raw_route = GENERATE_ROUTE
    info_route = "/info"

    def from_info(self, url: str, info: dict[str, Any]) -> ServerInfo | None:
        if "max_total_tokens" not in info:
            return None
        return ServerInfo(
            backend=self.name,
            name=self.title,
            url=url,
            model=str(info.get("model_id", NO_ADAPTER)),
            max_input_tokens=info.get("max_input_tokens"),
            max_total_tokens=info.get("max_total_tokens"),
            max_stop_sequences=info.get("max_stop_sequences"),
            version=info.get("version"),
            raw=info,
        )

    def from_models(self, url: str, listing: dict[str, Any], *, forced: bool = False) -> ServerInfo | None:
        return None  # TGI is recognised by /info; its /v1/models lists a container path

    def check_params(self, p: SamplingParams, api: str, info: ServerInfo) -> None:
        if api == "chat" and p.top_k is not None:
            raise InvalidParameterError(
                "TGI's /v1/chat/completions has no top_k; leave it unset, or use generate() (TGI /generate)"
            )
        limit = info.max_stop_sequences
        if limit is not None and len(p.stop) > limit:
            raise InvalidParameterError(
                f"TGI accepts at most {limit} stop sequences (its max_stop_sequences), got {len(p.stop)}"
            )

    def chat_fields(self, p: SamplingParams) -> dict:
        kwargs = openai_chat_fields(p, extras=False)
        if p.repetition_penalty is not None:
            # TGI's chat route derives repetition_penalty = presence_penalty + 2
            # (router/src/lib.rs, ChatRequest::try_into_generate in v3.3.7).
            kwargs["presence_penalty"] = p.repetition_penalty - 2.0
        return kwargs

    def raw_fields(self, p: SamplingParams) -> dict:
        """Keyword arguments for InferenceClient.text_generation against /generate."""
        kwargs: dict = {"max_new_tokens": p.max_new_tokens, "do_sample": p.sampling, "details": True}
        if p.sampling:
            kwargs["temperature"] = p.temperature
            if p.nucleus:
                kwargs["top_p"] = p.top_p
            if p.top_k is not None:
                kwargs["top_k"] = p.top_k
        if p.repetition_penalty is not None:
            kwargs["repetition_penalty"] = p.repetition_penalty
        if p.stop:
            kwargs["stop"] = list(p.stop)
        if p.seed is not None:
            kwargs["seed"] = p.seed
        return kwargs

    def chat_model(self, model: str, adapter: str | None) -> str:
        return adapter or NO_ADAPTER

    def check_adapter(
        self, adapter: str, info: ServerInfo, known: Sequence[str] | None, url: str
    ) -> str | None:
        """TGI lists no adapters and answers an unknown id with the base model: warn, cannot refuse."""
        if known is not None and adapter not in known:
            return (
                f"adapter_id {adapter!r} is not among the adapters TGI was started with "
                f"({', '.join(known) or 'none'}): TGI answers an unknown adapter id with "
                "the base model, without an error"
            )
        if known is None:
            return (
                f"cannot check adapter_id {adapter!r}: TGI does not list its adapters and answers an unknown "
                "id with the base model, without an error. Pass known_adapters= (or set LORA_ADAPTERS)."
            )
        return None

    def count_tokens(
        self, transport: Transport, info: ServerInfo, prompt: str | None, messages: list | None
    ) -> int | None:
        if messages is not None:
            out = transport.post_json("/chat_tokenize", {"model": NO_ADAPTER, "messages": messages})
            return len(out["tokenize_response"])
        return len(transport.post_json("/tokenize", {"inputs": prompt}))

    def check_model(self, model: ModelDir, num_shard: int) -> list[str]:
        """Everything TGI 3.3.7 fails on at start-up: the checks the merge step runs too."""
        report = check_serving(model.path, num_shard)
        failed = [c for c in report.checks if c.status == "fail"]
        if failed:
            problems = "\n".join(f"  {c.name}: {c.detail}" for c in failed)
            raise LaunchError(
                f"{model.path}: TGI cannot serve this model with {num_shard} shard(s):\n{problems}"
            )
        return [f"{model.path}: {c.detail}" for c in report.checks if c.status == "warn"]

    def launch_dtype(self, model: ModelDir, env: dict[str, str], warnings: list[str]) -> str | None:
        quantize, dtype = env.get("QUANTIZE") or None, env.get("DTYPE") or None
        if quantize is not None and quantize not in QUANTIZE:
            raise LaunchError(
                f"QUANTIZE={quantize!r} is not a TGI 3.3.7 method; choose one of: {', '.join(QUANTIZE)}"
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

    def plan_adapters(self, base_model: str, adapters: str, **limits) -> LaunchSettings:
        return plan_multi_lora(base_model, adapters, **limits)


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
    if model_type is not None and model_type not in MULTI_LORA:
        raise LaunchError(
            f"TGI 3.3.7 applies LoRA adapters for {', '.join(sorted(MULTI_LORA))} only, and "
            f"{base_model} is {model_type!r}: requests would be answered by the base model. Serve the merged "
            "model instead (unset LORA_ADAPTERS and LORA_BASE_MODEL)."
        )
    notes = []
    if base_config is None:
        notes.append(
            f"cannot read {base_model}'s config.json here (not a directory, not in the HF cache); "
            "its architecture and head count are unchecked"
        )
    lengths = []
    for name, path in entries:
        if path is None:
            notes.append(
                f"adapter {name} comes from the Hub; it is not checked here and needs HF_HUB_OFFLINE=0"
            )
            continue
        length = _check_adapter_dir(name, path, base_model, outputs, notes)
        if length is not None:
            lengths.append(length)
    heads = (base_config or {}).get("num_attention_heads")
    kv_heads = (base_config or {}).get("num_key_value_heads") or heads
    check_num_shard(heads, kv_heads, num_shard, "TGI", base_model)
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
        max_input_tokens=split_limits(total, max_input_tokens),
        context_source=source,
        warnings=notes,
    )


def _check_adapter_dir(name: str, path: str, base_model: str, outputs: Path, notes: list[str]) -> int | None:
    """Refuse adapters TGI cannot apply; return the max_length its recipe trained on."""
    local = _local_path(path, outputs)
    config = read_json(local / "adapter_config.json")
    if config is None:
        raise LaunchError(f"adapter {name}: {path} has no adapter_config.json (train the run first)")
    if config.get("use_dora"):
        raise LaunchError(f"adapter {name} uses DoRA, which TGI cannot apply; serve its merged model instead")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    unknown = sorted(set(targets) - LORA_TARGETS)
    if unknown:
        notes.append(f"adapter {name}: TGI ignores its layers on {', '.join(unknown)}")
    trained_on = config.get("base_model_name_or_path")
    if trained_on and trained_on != base_model:
        notes.append(f"adapter {name} was trained on {trained_on}, not {base_model}")
    template = read_chat_template(local)
    if template is not None and template != _base_chat_template(base_model):
        # TGI's router formats every chat request with the base model's tokenizer's template.
        notes.append(
            f"adapter {name}: TGI 3.3.7 formats chat with {base_model}'s chat template (a 422 where it has "
            "none), not the one this adapter was trained with: use generate (/generate) in its training "
            "prompt format, or serve its merged model"
        )
    return trained_max_length(local)


def _local_path(path: str, outputs: Path) -> Path:
    posix = PurePosixPath(path)
    if posix.is_relative_to(CONTAINER_OUTPUTS):
        return outputs / posix.relative_to(CONTAINER_OUTPUTS)
    return Path(path)


def _base_chat_template(base_model: str) -> str | None:
    """The base model's chat template where it can be read here (a directory), else None."""
    local = Path(base_model)
    return read_chat_template(local) if local.is_dir() else None


def _base_config(base_model: str) -> dict | None:
    local = Path(base_model)
    if local.is_dir():
        return read_json(local / "config.json")
    try:
        cached = try_to_load_from_cache(base_model, "config.json")
    except Exception:  # an id the cache cannot even parse: reported as unchecked
        return None
    return read_json(Path(cached)) if isinstance(cached, str) else None
