"""bench/mfu.py: the FLOPs MFU counts, checked against the parameters real models and adapters have."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from training.model.lora import lora_config
from training.model.tiny import resolve_model_name
from training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is scripts, not a package: as the script itself sees it

from mfu import attention_context, flop_terms, flops_per_token, peak_flops  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
@pytest.mark.parametrize("targets", ["auto", "all-linear"])
def test_terms_count_the_matmuls_and_adapters_of_a_real_model(tiny_dir, arch, targets):
    lora = [f"lora.target_modules={targets}"] + (
        ["lora.include_mlp=false"] if targets == "all-linear" else []
    )
    recipe = load_recipe("recipes/quickstart.yaml", [f"model.name=tiny://{arch}", *lora])
    model_dir = resolve_model_name(recipe.model.name)
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    matmuls = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    peft_model = get_peft_model(model, lora_config(recipe.lora, model))
    adapters = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)

    terms = flop_terms(config, recipe.lora)
    assert terms["matmul_params"] == matmuls  # every decoder layer's linears and the output head
    assert terms["lora_params"] == adapters


def test_llama_2_7b_matmuls_are_its_published_parameters_less_embeddings_and_norms():
    config = AutoConfig.from_pretrained(ROOT / "bench" / "configs" / "llama-2-7b.json")
    terms = flop_terms(
        config, load_recipe("bench/recipes/gpu-7b-varlen.yaml", []).lora
    )  # r 16, attention and MLP
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    assert terms["matmul_params"] == 6_738_415_616 - config.vocab_size * config.hidden_size - norms
    # LoRA's basis drops the frozen weights' gradients: about two thirds of the model basis at 2,048 tokens.
    model, lora = flops_per_token(terms, 2048, "model"), flops_per_token(terms, 2048, "lora")
    assert 0.65 < lora / model < 0.72


def test_peak_flops_knows_the_data_sheet_gpus_and_takes_an_override():
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA GeForce RTX 4090") is None
    assert peak_flops("NVIDIA GeForce RTX 4090", 165.2) == pytest.approx(165.2e12)


def test_attention_context_weights_each_row_by_its_tokens():
    """A row of s tokens is s tokens each attending over s positions: equal rows give their length,
    uneven ones more than their mean (the mean would undercount their attention)."""
    assert attention_context([256] * 8) == 256
    assert attention_context([64, 192]) == pytest.approx((64**2 + 192**2) / 256)  # 160, mean 128
    assert attention_context(iter([10])) == 10
