"""Will TGI load this model directory, and shard it over N GPUs? Checked before anything starts.

Each rule names what TGI 3.3.7 (the pinned image, transformers 4.51 inside) needs and
fails on at start-up, often minutes into loading a large model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

# model_type values TGI 3.3.7 implements itself (server/text_generation_server/models/__init__.py
# at tag v3.3.7): these shard over GPUs, and some take LoRA adapters per request.
TGI_NATIVE = frozenset(
    {
        "deepseek_v2",
        "deepseek_v3",
        "llama",
        "llama4",
        "phi3",
        "granite",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "cohere",
        "dbrx",
        "mistral",
        "mixtral",
        "gpt_bigcode",
        "phi",
        "phimoe",
        "baichuan",
        "falcon",
        "starcoder2",
        "qwen2",
        "opt",
        "bloom",
        "mpt",
        "gpt2",
        "gpt_neox",
        "gptj",
    }
)
# Others that TGI serves through its transformers backend (transformers 4.51 inside the image):
# one GPU only (its docs: tensor parallelism is for the native models), no multi-LoRA.
TGI_TRANSFORMERS_BACKEND = frozenset({"qwen3", "qwen3_moe", "olmo", "olmo2", "cohere2", "glm", "helium"})
# Architectures whose TGI model code looks up lm_head.weight even when embeddings are tied.
_NEEDS_EXPLICIT_LM_HEAD = TGI_NATIVE - {"llama", "qwen2", "gemma", "gemma2", "gemma3", "granite", "phi3"}


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str


@dataclass
class ServingReport:
    model_dir: str
    num_shard: int
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, *, warn_only: bool = False) -> None:
        self.checks.append(Check(name, "ok" if ok else ("warn" if warn_only else "fail"), detail))

    def as_dict(self) -> dict:
        return {
            "model_dir": self.model_dir,
            "num_shard": self.num_shard,
            "ok": self.ok,
            "checks": [vars(c) for c in self.checks],
        }

    def format(self) -> str:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        verdict = "can" if self.ok else "cannot"
        lines = [f"TGI {verdict} load {self.model_dir} with --num-shard {self.num_shard}:"]
        lines += [f"  {marks[c.status]} {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


def check_serving(model_dir: str | Path, num_shard: int = 1) -> ServingReport:
    model_dir = Path(model_dir)
    report = ServingReport(str(model_dir), num_shard)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        report.add("config", False, "config.json is missing")
        return report
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type", "?")

    if model_type in TGI_NATIVE:
        report.add("architecture", True, f"{model_type} has a native TGI implementation")
    elif model_type in TGI_TRANSFORMERS_BACKEND:
        detail = f"{model_type} runs on TGI's transformers backend (no native implementation, no multi-LoRA)"
        if num_shard > 1:
            report.add(
                "architecture", False, detail + ", which does not shard: serve on one GPU or with vLLM"
            )
        else:
            report.add("architecture", False, detail, warn_only=True)
    else:
        report.add("architecture", False, f"{model_type} is not supported by TGI 3.3.7; serve it with vLLM")

    weights = _weight_names(model_dir)
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    report.add(
        "safetensors",
        bool(weights) and not pickles,
        f"{len(weights)} tensors in safetensors"
        if weights and not pickles
        else f"pickled files present: {pickles}"
        if pickles
        else "no *.safetensors weights",
    )
    report.add(
        "not an adapter",
        not (model_dir / "adapter_config.json").exists(),
        "no adapter_config.json"
        if not (model_dir / "adapter_config.json").exists()
        else "adapter_config.json present: TGI would treat the folder as an adapter",
    )
    if config.get("tie_word_embeddings") and "lm_head.weight" not in weights:
        report.add(
            "output head",
            model_type not in _NEEDS_EXPLICIT_LM_HEAD,
            "tied embeddings without lm_head.weight: TGI fails with 'lm_head.weight does not exist'"
            if model_type in _NEEDS_EXPLICIT_LM_HEAD
            else "tied embeddings; TGI ties them itself",
        )
    else:
        report.add("output head", True, "lm_head.weight present" if "lm_head.weight" in weights else "untied")

    _check_tokenizer(model_dir, report)
    _check_config_keys(config, report)
    _check_sharding(config, num_shard, report)
    return report


def _weight_names(model_dir: Path) -> set[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if all((model_dir / f).is_file() for f in set(weight_map.values())):
            return set(weight_map)
        return set()
    names: set[str] = set()
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())
    return names


def _check_tokenizer(model_dir: Path, report: ServingReport) -> None:
    report.add(
        "tokenizer.json",
        (model_dir / "tokenizer.json").is_file(),
        "present" if (model_dir / "tokenizer.json").is_file() else "missing (TGI needs a fast tokenizer)",
    )
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    has_template = bool(config.get("chat_template"))
    detail = (
        "chat_template in tokenizer_config.json"
        if has_template
        else (
            "no chat_template in tokenizer_config.json (TGI 3.3.7 does not read chat_template.jinja): "
            "/v1/chat/completions would answer 422 template_error"
        )
    )
    report.add("chat template", has_template, detail)
    cls = config.get("tokenizer_class")
    report.add(
        "tokenizer class",
        cls != "TokenizersBackend",
        f"{cls}" if cls != "TokenizersBackend" else "TokenizersBackend is unknown to TGI's transformers 4.51",
    )


def _check_config_keys(config: dict, report: ServingReport) -> None:
    # TGI does not read the dtype from config.json: it loads float16 unless started with --dtype
    # (make serve passes the model's own dtype), so this only informs.
    dtype = config.get("torch_dtype") or config.get("dtype")
    note = {"bfloat16": " (start TGI with --dtype bfloat16)", "float32": " (TGI serves it in float16)"}
    report.add(
        "dtype",
        dtype is not None,
        f"{dtype}{note.get(dtype, '')}" if dtype else "not recorded",
        warn_only=True,
    )
    rope = config.get("rope_parameters")
    # transformers 5 writes rope settings only under rope_parameters; TGI's 4.51 then reads its
    # defaults (theta 10000, no scaling), which is harmless only when those are the settings.
    nondefault = isinstance(rope, dict) and (
        rope.get("rope_theta") not in (None, 10000, 10000.0) or rope.get("rope_type", "default") != "default"
    )
    if nondefault and "rope_theta" not in config:
        report.add(
            "rope",
            False,
            f"rope_theta {rope.get('rope_theta')} only under rope_parameters: TGI's transformers 4.51 would "
            "use rope_theta=10000; merge again to write it at the top level",
        )
    if config.get("max_position_embeddings") is None:
        report.add("context length", False, "max_position_embeddings missing", warn_only=True)


def _check_sharding(config: dict, num_shard: int, report: ServingReport) -> None:
    if num_shard < 1:
        report.add("sharding", False, f"--num-shard must be at least 1, got {num_shard}")
        return
    heads = config.get("num_attention_heads")
    dims = {
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads", heads),
        "intermediate_size": config.get("intermediate_size"),
        "hidden_size": config.get("hidden_size"),
    }
    bad = [f"{k}={v}" for k, v in dims.items() if v is not None and v % num_shard]
    report.add(
        "sharding",
        not bad,
        f"{', '.join(f'{k}={v}' for k, v in dims.items() if v is not None)} divide by {num_shard}"
        if not bad
        else f"{', '.join(bad)} not divisible by --num-shard {num_shard}",
    )
