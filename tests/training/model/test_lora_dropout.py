"""The fused LoRA dropout: peft's dropout + lora_A, the same values and gradients, less kept for backward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from training.model.loading import Device, load_model
from training.model.lora_dropout import DroppedLinear, effective_rate, fuse_lora_dropout, keep_mask
from training.recipe import ModelSection, QuantizationSection


def load_4bit():
    """The tiny Llama with real bitsandbytes NF4 layers on the CPU (peft wraps a model in place)."""
    cpu = Device("cpu", "cpu", 1, False)
    return load_model(ModelSection(name="tiny://llama"), QuantizationSection(), cpu, torch.float32)[0]


@pytest.fixture
def tiny_4bit_model(tiny_dir):
    return load_4bit()


def dropped_linear(weight: torch.Tensor, p: float) -> DroppedLinear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return DroppedLinear.take_over(layer, p).train()


def test_same_output_and_gradients_as_dropout_then_linear_with_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 32, requires_grad=True)
    weight = torch.randn(8, 32)
    layer = dropped_linear(weight, 0.3)

    torch.manual_seed(1)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    torch.manual_seed(1)
    keep = keep_mask(x, 0.3)  # the mask the layer drew, drawn again from the same generator state
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = weight.clone().requires_grad_(True)
    ref = nn.functional.linear(x_ref * keep / (1 - effective_rate(0.3)), w_ref)
    ref.backward(grad_out)

    assert 0 < int((~keep).sum()) < keep.numel()
    # float32 sums in another order (seen: 2.3e-6 apart on one of 168 outputs of about 1).
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_drops_at_the_requested_rate_and_keeps_the_expected_value(p):
    torch.manual_seed(0)
    x = torch.ones(200_000, 1)
    layer = dropped_linear(torch.ones(1, 1), p)
    out = layer(x)
    dropped = float((out == 0).float().mean())
    assert dropped == pytest.approx(p, abs=0.005)
    assert abs(effective_rate(p) - p) <= 2**-17
    assert float(out.detach().mean()) == pytest.approx(1.0, abs=0.01)  # rescaled by 1/(1-p): same expectation


def test_evaluation_mode_is_a_plain_linear_layer():
    x = torch.randn(4, 16)
    weight = torch.randn(8, 16)
    layer = dropped_linear(weight, 0.5).eval()
    torch.testing.assert_close(layer(x), x @ weight.T)


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn` runs."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_keeps_a_byte_per_element_instead_of_two_float_copies():
    x = torch.randn(8, 64, 128, requires_grad=True)
    dropout, linear = nn.Dropout(0.05).train(), nn.Linear(128, 16, bias=False)
    fused = dropped_linear(linear.weight.detach(), 0.05)
    unfused = saved_bytes(lambda: [linear(dropout(x)) for _ in range(3)])  # q, k and v on one input
    ours = saved_bytes(lambda: [fused(x) for _ in range(3)])
    assert unfused >= 6 * x.numel() * 4  # noise and dropped copy, per module
    assert ours <= x.numel() * 4 + 3 * x.numel() + 3 * linear.weight.numel() * 4


def test_fuses_plain_lora_layers_of_a_real_4bit_model_and_keeps_the_adapter(tiny_4bit_model):
    model = get_peft_model(
        tiny_4bit_model,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    keys = set(model.state_dict())
    layers = model.base_model.model.config.num_hidden_layers
    model.eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits

    assert fuse_lora_dropout(model) == 3 * layers
    assert fuse_lora_dropout(model) == 0  # already fused
    assert set(model.state_dict()) == keys  # same parameters, same names: checkpoints load as before
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # evaluation: no dropout

    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_leaves_dora_and_dropout_free_layers_alone(tiny_4bit_model):
    model = get_peft_model(
        tiny_4bit_model, LoraConfig(r=4, lora_dropout=0.1, use_dora=True, target_modules=["q_proj"])
    )
    assert fuse_lora_dropout(model) == 0
    model = get_peft_model(load_4bit(), LoraConfig(r=4, lora_dropout=0.0, target_modules=["k_proj"]))
    assert fuse_lora_dropout(model) == 0


def test_checkpointing_recomputes_the_same_masks(tiny_4bit_model):
    # Activation checkpointing runs each layer's forward again in the backward pass; torch restores
    # the generator's state for it, so the fused dropout draws the masks it drew the first time.
    model = get_peft_model(
        tiny_4bit_model, LoraConfig(r=4, lora_dropout=0.3, target_modules=["q_proj", "up_proj"])
    )
    assert fuse_lora_dropout(model) > 0
    model.train()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 11]])

    def grads():
        model.zero_grad()
        torch.manual_seed(3)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
