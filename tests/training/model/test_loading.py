"""Model loading: real bitsandbytes layers on the CPU, a loud failure when quantization did not apply."""

from __future__ import annotations

import shutil

import pytest
import torch

from training.errors import ModelLoadError, RecipeError
from training.model.loading import Device, compute_dtype, load_model, verify_quantization
from training.model.lora import lora_config, target_modules
from training.recipe import LoraSection, ModelSection, QuantizationSection

CPU = Device("cpu", "cpu", 1, False)


def load(arch="llama", method="nf4", **q):
    return load_model(
        ModelSection(name=f"tiny://{arch}"), QuantizationSection(method=method, **q), CPU, torch.float32
    )


@pytest.mark.parametrize(
    ("method", "layer"), [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")]
)
def test_bitsandbytes_layers_are_really_quantized(tiny_dir, method, layer):
    model, report = load(method=method)
    quantized = [m for m in model.modules() if type(m).__name__ == layer]
    assert len(quantized) == report["quantized_layers"] == 14  # 7 linear layers x 2 blocks
    if method != "int8":
        assert {m.weight.quant_type for m in quantized} == {method}
    logits = model(torch.tensor([[1, 40, 41]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()


def test_report_counts_memory_footprint(tiny_dir):
    _, nf4 = load(method="nf4")
    _, plain = load(method="none")
    assert nf4["footprint_bytes"] < plain["footprint_bytes"]
    assert plain["quantized_layers"] == 0 and plain["description"] == "unquantized torch.float32"


def test_unapplied_quantization_fails_loudly(tiny_dir):
    model, _ = load(method="none")  # what a silently ignored 4-bit request looks like
    with pytest.raises(ModelLoadError, match=r"did not load quantized: 0 quantized linear layers, 14 left"):
        verify_quantization(model, "nf4")
    quantized, _ = load(method="nf4")
    with pytest.raises(ModelLoadError, match="weights are \\['nf4'\\]"):
        verify_quantization(quantized, "fp4")


def test_gptq_without_gpu_kernels_says_so(tiny_dir):
    with pytest.raises(ModelLoadError) as e:
        load(method="gptq")
    assert "GPTQ kernels on an NVIDIA GPU" in str(e.value) and "no CUDA GPU" in str(e.value)


def test_missing_model_and_remote_code_hints(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load the model"):
        load_model(ModelSection(name=str(tmp_path / "nowhere")), QuantizationSection(), CPU, torch.float32)
    assert ModelSection(name="x").trust_remote_code is False


def test_compute_dtype_by_device():
    assert compute_dtype("auto", CPU) == torch.float32
    assert compute_dtype("float16", CPU) == torch.float32  # 16-bit math on the CPU is emulated and slow
    ampere = Device("cuda", "A100", 1, True)
    turing = Device("cuda", "T4", 1, False)
    assert compute_dtype("auto", ampere) == torch.bfloat16
    assert compute_dtype("auto", turing) == torch.float16
    with pytest.raises(ModelLoadError, match="does not support bf16"):
        compute_dtype("bfloat16", turing)


def test_lora_targets_by_architecture(tiny_dir):
    llama, _ = load("llama")
    neox, _ = load("gpt-neox")
    assert target_modules(LoraSection(), llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert target_modules(LoraSection(include_mlp=True), llama)[-3:] == ["gate_proj", "up_proj", "down_proj"]
    assert target_modules(LoraSection(), neox) == [
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
    ]
    assert target_modules(LoraSection(target_modules="all-linear"), neox) == "all-linear"
    with pytest.raises(RecipeError, match=r"\['wq'\] match no linear layer.*'q_proj'"):
        target_modules(LoraSection(target_modules=["wq", "q_proj"]), llama)
    config = lora_config(LoraSection(r=4, alpha=8, use_rslora=True, use_dora=True), llama)
    assert (config.r, config.lora_alpha, config.use_rslora, config.use_dora) == (4, 8, True, True)


def test_only_hub_failures_get_the_hub_hint_others_keep_their_type(tmp_path, tiny_dir):
    from safetensors import SafetensorError

    # Not a hub problem: a broken weights file keeps its own error (as a CUDA out-of-memory or a
    # bitsandbytes failure would), with its message, instead of "check your network".
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir / "llama", broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(SafetensorError, match="invalid JSON in header"):
        load_model(ModelSection(name=str(broken)), QuantizationSection(), CPU, torch.float32)
    # A hub id that is neither cached nor reachable (the tests run with HF_HUB_OFFLINE=1): the hint.
    with pytest.raises(ModelLoadError, match="Check the name, your network, and HF_TOKEN") as e:
        load_model(ModelSection(name="nobody-here/no-such-model"), QuantizationSection(), CPU, torch.float32)
    assert e.value.__cause__ is not None  # the hub's own error stays attached
