"""Attention per packed sequence (sdpa_varlen): the same logits and gradients as each sequence alone
and as SDPA's block mask, on real tiny models; everything else falls through to SDPA."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tests.conftest import read_run, train_in_process
from training.model.tiny import resolve_model_name
from training.model.varlen_attention import NAME, enable_varlen_attention, sdpa_varlen_attention

# A length-1 sequence and one of the longest, in no particular order.
LENGTHS = [120, 37, 1, 250, 90, 64]


def packed_inputs(lengths, vocab=2000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    boundaries = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    longest = max(lengths)
    return {
        "input_ids": ids,
        "position_ids": positions,
        "cu_seq_lens_q": boundaries,
        "cu_seq_lens_k": boundaries,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def forward_backward(model, inputs):
    """Logits and every parameter's gradient, as the trainer runs a packed batch."""
    model.train()
    model.zero_grad()
    logits = model(**inputs, use_cache=False).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def each_alone(model, inputs, lengths):
    """The reference: each sequence through the model by itself."""
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model(input_ids=part, use_cache=False).logits for part in inputs["input_ids"].split(lengths, 1)],
            1,
        )


def tiny(arch):
    return AutoModelForCausalLM.from_pretrained(resolve_model_name(f"tiny://{arch}"), dtype=torch.float32)


def gqa_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).float()


@pytest.mark.parametrize(
    "build", [lambda: tiny("llama"), lambda: tiny("gpt-neox"), gqa_llama], ids=["llama", "gpt-neox", "gqa"]
)
def test_packed_attention_equals_each_sequence_alone_and_the_block_mask(tiny_dir, build):
    inputs = packed_inputs(LENGTHS)
    masked = build()
    varlen = build()
    varlen.load_state_dict(masked.state_dict())
    assert enable_varlen_attention(varlen) and varlen.config._attn_implementation == NAME

    alone = each_alone(masked, inputs, LENGTHS)
    mask_logits, mask_grads = forward_backward(masked, inputs)
    varlen_logits, varlen_grads = forward_backward(varlen, inputs)

    # float32 sums over other lengths (the mask's masked-out keys add zeros): last-bit differences,
    # a few 1e-6 here; attending across examples would change logits by whole units.
    torch.testing.assert_close(varlen_logits, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(varlen_logits, mask_logits, rtol=1e-4, atol=1e-4)
    assert varlen_grads.keys() == mask_grads.keys() and varlen_grads
    for name, grad in varlen_grads.items():
        torch.testing.assert_close(grad, mask_grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_batches_without_sequence_boundaries_are_plain_sdpa(tiny_dir):
    sdpa, varlen = tiny("llama"), tiny("llama")
    enable_varlen_attention(varlen)
    ids = torch.randint(5, 2000, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding in one row: the mask must still apply
    for model in (sdpa, varlen):
        model.eval()
    with torch.no_grad():
        for kwargs in ({"attention_mask": mask}, {}):
            expected = sdpa(input_ids=ids, **kwargs).logits
            torch.testing.assert_close(varlen(input_ids=ids, **kwargs).logits, expected, rtol=0, atol=0)


def test_sliding_window_models_keep_the_mask(tiny_dir):
    """A window shorter than the sequences: attention per sequence would see too far back, so the
    block mask (which carries the window) is used."""
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=16, attn_implementation="sdpa",
    )  # fmt: skip
    masked = MistralForCausalLM(config).float()
    varlen = MistralForCausalLM(config).float()
    varlen.load_state_dict(masked.state_dict())
    assert enable_varlen_attention(varlen)
    inputs = packed_inputs([40, 30, 50])
    alone = each_alone(masked, inputs, [40, 30, 50])
    torch.testing.assert_close(forward_backward(varlen, inputs)[0], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "settings", [{"is_causal": False}, {"output_attentions": True}], ids=["bidirectional", "weights"]
)
def test_attention_the_boundaries_cannot_express_is_left_to_sdpa(settings):
    """Bidirectional attention, or asking for the weights: plain SDPA with the mask it was given."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 10, 8, generator=generator) for _ in range(3))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=1, layer_idx=0, training=False)
    boundaries = torch.tensor([0, 4, 10], dtype=torch.int32)
    expected = sdpa_attention_forward(module, query, key, value, None, **settings)[0]
    got = sdpa_varlen_attention(module, query, key, value, None, cu_seq_lens_q=boundaries, **settings)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    per_example = sdpa_varlen_attention(module, query, key, value, None, cu_seq_lens_q=boundaries)[0]
    assert not torch.allclose(per_example, expected)


def test_only_sdpa_models_are_switched(tiny_dir):
    eager = AutoModelForCausalLM.from_pretrained(
        resolve_model_name("tiny://llama"), attn_implementation="eager"
    )
    assert not enable_varlen_attention(eager) and eager.config._attn_implementation == "eager"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["data.packing=true", "training.padding_free=true"])
def test_padding_free_training_attends_per_example(tiny_dir, tmp_path, caplog, monkeypatch, layout):
    """The trainer switches a packed or padding-free run to sdpa_varlen and TRL's batches reach it
    with their sequence boundaries, in training and in evaluation."""
    calls = {"with boundaries": 0, "without": 0}

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls["with boundaries" if kwargs.get("cu_seq_lens_q") is not None else "without"] += 1
        return sdpa_varlen_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, counting)
    settings = [layout, "training.max_steps=2", "training.save_steps=1000"]
    with caplog.at_level(logging.INFO, logger="training.train.builder"):
        assert train_in_process("recipes/quickstart.yaml", tmp_path, *settings) == 0
    assert any(NAME in record.getMessage() for record in caplog.records)
    run = read_run(tmp_path / "quickstart")
    assert run["status"] == "complete" and run["model"]["attn_implementation"] == NAME
    assert calls["with boundaries"] >= 2 * 2 and calls["without"] == 0, calls


@pytest.mark.slow
def test_padding_free_rows_train_the_same_batches_to_the_same_losses(tiny_dir, tmp_path):
    """Unpacked padding-free batches are the recipe's own rows, flattened: the same tokens per step
    and the same losses as padded batches (dropout off, whose draws depend on the padding)."""
    settings = [
        "lora.dropout=0",
        "training.max_steps=4",
        "training.logging_steps=1",
        "training.save_steps=1000",
    ]
    runs = {}
    for name, extra in (("padded", []), ("padding-free", ["training.padding_free=true"])):
        assert train_in_process("recipes/quickstart.yaml", tmp_path / name, *settings, *extra) == 0
        runs[name] = read_run(tmp_path / name / "quickstart")
    padded, flat = runs["padded"], runs["padding-free"]
    assert padded["model"]["attn_implementation"] == "sdpa" and flat["model"]["attn_implementation"] == NAME
    assert flat["metrics"]["tokens_trained"] == padded["metrics"]["tokens_trained"]
    losses = [[entry["loss"] for entry in run["history"] if "loss" in entry] for run in (padded, flat)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-4)
