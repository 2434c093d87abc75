"""The same QLoRA path on an NVIDIA GPU: 4-bit layers on the device, bf16 compute, it learns, it merges.

Skipped where no GPU is present (the development and CI machines); run on a GPU machine
with `pytest -m cuda`.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import read_run, train_in_process
from training.merge.coordinator import MergeSettings, merge_adapter
from training.model.loading import compute_dtype, detect_device, load_model
from training.recipe import load_recipe

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

QUICK = "recipes/quickstart.yaml"


def test_model_loads_in_4bit_on_the_gpu_with_bf16_compute(tiny_dir):
    import bitsandbytes as bnb

    recipe = load_recipe(QUICK, [])
    device = detect_device()
    assert device.type == "cuda"
    dtype = compute_dtype(recipe.model.dtype, device)
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    model, _ = load_model(recipe.model, recipe.quantization, device, dtype)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    for layer in layers:
        assert layer.weight.device.type == "cuda" and layer.weight.quant_state.quant_type == "nf4"
        assert layer.compute_dtype == dtype


def test_qlora_on_the_gpu_lowers_eval_loss_and_merges(tmp_path, tiny_dir):

    assert train_in_process(QUICK, tmp_path) == 0
    run_dir = tmp_path / "quickstart"
    run = read_run(run_dir)
    assert run["compute_dtype"] in ("bfloat16", "float16")
    assert run["metrics"]["eval_loss"] < run["metrics"]["eval_loss_start"] - 0.1
    assert run["metrics"]["peak_memory"].get("cuda_allocated", 0) > 0
    # Verification compares the merged model's logits with base + adapter on the GPU.
    merge_adapter(run_dir / "adapter", run_dir / "merged", MergeSettings(verify=True))
    assert (run_dir / "merged" / "model.safetensors").is_file()


def test_gpu_defaults_group_batches_drop_checkpointing_where_memory_allows_and_use_liger(tmp_path, tiny_dir):
    from training.train.builder import build_trainer
    from training.train.hardware import installed
    from training.train.sft_config import build_sft_config

    recipe = load_recipe(QUICK, [f"output.dir={tmp_path}", "data.validation=null"])
    device = detect_device()
    dtype = compute_dtype(recipe.model.dtype, device)
    args = build_sft_config(recipe, device, str(dtype).removeprefix("torch."), QUICK)
    trainer = build_trainer(recipe, args, device, dtype).trainer
    assert trainer.args.train_sampling_strategy == "group_by_length"
    assert trainer.args.activation_checkpointing is False  # the tiny model fits any GPU without it
    assert trainer.args.use_liger_kernel is installed("liger_kernel")  # llama is in Liger's table


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
def test_packed_attention_on_the_gpu_is_flash_varlen_and_equals_the_block_mask(tiny_dir, arch, monkeypatch):
    """sdpa_varlen takes torch's flash varlen kernel on the GPU (bf16) and gives the block mask's
    logits and gradients within bf16's precision."""
    from tests.training.model.test_varlen_attention import LENGTHS, forward_backward, packed_inputs, tiny
    from training.model import varlen_attention

    masked = tiny(arch).to("cuda", torch.bfloat16)
    varlen = tiny(arch).to("cuda", torch.bfloat16)
    assert varlen_attention.enable_varlen_attention(varlen)
    inputs = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in packed_inputs(LENGTHS).items()}
    flash_calls = []
    original = varlen_attention._flash_varlen

    def counting(*args):
        flash_calls.append(1)
        return original(*args)

    monkeypatch.setattr(varlen_attention, "_flash_varlen", counting)
    varlen_logits, varlen_grads = forward_backward(varlen, inputs)
    mask_logits, mask_grads = forward_backward(masked, inputs)
    assert len(flash_calls) == varlen.config.num_hidden_layers
    torch.testing.assert_close(varlen_logits.float(), mask_logits.float(), rtol=2e-2, atol=2e-2)
    for name, grad in varlen_grads.items():
        torch.testing.assert_close(grad.float(), mask_grads[name].float(), rtol=5e-2, atol=5e-3, msg=name)


def test_a_profiled_gpu_run_counts_the_time_its_kernels_kept_the_gpu_busy(tmp_path, tiny_dir):
    import re

    assert (
        train_in_process(QUICK, tmp_path, "training.max_steps=3", "data.validation=null", profile_steps=2)
        == 0
    )
    ops = (tmp_path / "quickstart" / "profile" / "ops.txt").read_text()
    busy = re.search(r"GPU kernels: ([0-9.]+) s, (\d+)% of the wall time", ops)
    assert busy and float(busy.group(1)) > 0 and int(busy.group(2)) > 0, ops[:500]
    assert "sorted by self_device_time_total" in ops and "Self CUDA" in ops
