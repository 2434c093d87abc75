"""LoRA settings: which modules to adapt, and the peft LoraConfig for them."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from peft import LoraConfig

from training.errors import RecipeError
from training.recipe import LoraSection

_LLAMA_LIKE = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
# GPT-NeoX (Polyglot-ko, OpenCALM) has fused attention; its four linear layers are adapted together.
_GPT_NEOX = {"attention": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], "mlp": []}

AUTO_TARGETS = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": {"attention": _LLAMA_LIKE["attention"], "mlp": []},
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gpt_neox": _GPT_NEOX,
}


def target_modules(cfg: LoraSection, model) -> str | list[str]:
    """Resolve auto / all-linear / an explicit list against the loaded model."""
    if cfg.target_modules == "all-linear":
        return "all-linear"  # peft's own keyword: every linear layer except the output head
    if cfg.target_modules == "auto":
        model_type = model.config.model_type
        if model_type not in AUTO_TARGETS:
            raise RecipeError(
                f"lora.target_modules: auto knows no targets for architecture {model_type!r} "
                f"(known: {', '.join(sorted(AUTO_TARGETS))}); use all-linear or list the modules, "
                f"e.g. {linear_module_names(model)[:6]}"
            )
        targets = AUTO_TARGETS[model_type]
        return targets["attention"] + (targets["mlp"] if cfg.include_mlp else [])
    available = linear_module_names(model)
    missing = [t for t in cfg.target_modules if t not in available]
    if missing:
        raise RecipeError(
            f"lora.target_modules: {missing} match no linear layer of this model; available: {available}"
        )
    return list(cfg.target_modules)


def linear_module_names(model) -> list[str]:
    """Short names of the model's linear layers (quantized ones included), output head excluded."""

    linear = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, linear)}
    names.discard("lm_head")
    names.discard("embed_out")
    return sorted(names)


def lora_config(cfg: LoraSection, model) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        bias=cfg.bias,
        target_modules=target_modules(cfg, model),
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        modules_to_save=cfg.modules_to_save,
        task_type="CAUSAL_LM",
    )
