"""tiny://qwen2: shaped as Qwen2.5-Instruct comes, so the model's own template and tool calls run offline.

The tool-call quickstart on it, trained, merged and served with vLLM's parser, is tested whole in
tests/serving/backends/test_vllm_cpu.py (make test-vllm)."""

from __future__ import annotations

import json

from safetensors import safe_open
from transformers import AutoTokenizer
from trl.chat_template_utils import get_training_chat_template, supports_tool_calling

from training.model.tiny import QWEN_TEMPLATE, TOOL_CALL_TOKENS


def test_it_has_qwen25s_tokens_template_and_biases(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "qwen2")
    # Qwen2.5-Instruct: no BOS, <|im_end|> ends a turn and the text, <|endoftext|> pads.
    assert tokenizer.bos_token is None and tokenizer("Hello")["input_ids"][0] != tokenizer.eos_token_id
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    # The tool-call tags are single tokens, as in Qwen's vocabulary.
    assert all(len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1 for tag in TOOL_CALL_TOKENS)
    # Its template is Qwen2.5's own, byte for byte: TRL recognises it and has its training version.
    assert tokenizer.chat_template == QWEN_TEMPLATE.read_text(encoding="utf-8")
    assert supports_tool_calling(tokenizer) and get_training_chat_template(tokenizer) is not None
    config = json.loads((tiny_dir / "qwen2" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["num_key_value_heads"] == 1
    with safe_open(tiny_dir / "qwen2" / "model.safetensors", "pt") as f:
        assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= set(
            f.keys()
        )
