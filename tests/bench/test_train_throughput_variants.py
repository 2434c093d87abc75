"""The bench's switched-back variants really switch the CPU defaults back (else they measure the recipe)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from trl import SFTTrainer

from training.model.loading import compute_dtype, detect_device
from training.model.lora_dropout import DroppedLinear
from training.model.varlen_attention import NAME as VARLEN_ATTENTION
from training.recipe import load_recipe
from training.train.builder import build_trainer
from training.train.loss import QLoRASFTTrainer
from training.train.sft_config import build_sft_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is scripts, not a package: as the script itself sees it

from train_throughput import VARIANTS, switch_backs  # noqa: E402

QUICK = "recipes/quickstart.yaml"


def trainer_of(tmp_path, *overrides):
    recipe = load_recipe(QUICK, [f"output.dir={tmp_path}", "data.validation=null", *overrides])
    device = detect_device()
    args = build_sft_config(recipe, device, "float32", QUICK)
    return build_trainer(recipe, args, device, compute_dtype(recipe.model.dtype, device)).trainer


def test_before_cpu_defaults_builds_trls_trainer_with_peft_dropout(tiny_dir, tmp_path, monkeypatch):
    switched = switch_backs(VARIANTS["recipe+before-cpu-defaults"])
    assert len(switched) == 2
    for module, name, replacement in switched:
        monkeypatch.setattr(module, name, replacement)  # raises where the name is gone
    trainer = trainer_of(tmp_path)
    assert type(trainer) is SFTTrainer
    assert any(isinstance(m, torch.nn.Dropout) for m in trainer.model.modules())
    assert not any(isinstance(m, DroppedLinear) for m in trainer.model.modules())


def test_the_recipe_as_shipped_keeps_the_cpu_defaults(tiny_dir, tmp_path):
    assert switch_backs(VARIANTS["recipe"]) == []
    trainer = trainer_of(tmp_path)
    assert type(trainer) is QLoRASFTTrainer
    assert any(isinstance(m, DroppedLinear) for m in trainer.model.modules())


def test_block_mask_variant_keeps_plain_sdpa_for_packed_batches(tiny_dir, tmp_path, monkeypatch):
    assert trainer_of(tmp_path, "data.packing=true").model.config._attn_implementation == VARLEN_ATTENTION
    switched = switch_backs(VARIANTS["recipe+packing+block-mask"])
    assert len(switched) == 1
    for module, name, replacement in switched:
        monkeypatch.setattr(module, name, replacement)
    assert trainer_of(tmp_path, "data.packing=true").model.config._attn_implementation == "sdpa"
