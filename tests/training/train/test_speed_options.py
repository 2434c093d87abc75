"""Speed options in recipes: they reach the trainer and the model, and they train."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.conftest import read_run, train_in_process
from training.model.loading import Device
from training.recipe import load_recipe
from training.train.sft_config import build_sft_config

QUICK = "recipes/quickstart.yaml"
CPU = Device("cpu", "cpu", 1, False)


def test_speed_settings_pass_through_to_sftconfig():
    recipe = load_recipe(
        QUICK,
        [
            "training.torch_compile=true",
            "training.activation_checkpointing_kwargs={use_reentrant: true}",
            "data.packing=true",
        ],
    )
    args = build_sft_config(recipe, CPU, "float32")
    assert args.torch_compile is True and args.packing is True
    assert args.activation_checkpointing is True
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True}


@pytest.mark.slow
def test_eager_attention_packing_and_reentrant_checkpointing_train(tiny_dir, tmp_path):
    settings = [
        "model.attn_implementation=eager",
        "data.packing=true",
        "data.validation=null",
        "training.activation_checkpointing_kwargs={use_reentrant: true}",
        "training.max_steps=3",
        "training.logging_steps=1",
        "training.save_steps=1000",
    ]
    assert train_in_process(QUICK, tmp_path, *settings) == 0
    run = read_run(tmp_path / "quickstart")
    assert run["status"] == "complete" and run["metrics"]["global_step"] == 3
    # LoRA B starts at zero: it moved only if gradients flowed through the reentrant checkpoints
    # (which need inputs that require grad, with the 4-bit base frozen).
    weights = load_file(tmp_path / "quickstart" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)
