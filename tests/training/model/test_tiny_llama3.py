"""tiny://llama3: shaped as Llama-3.1-Instruct comes, so a template without {% generation %} markers,
and tool calls written as bare JSON, run offline.

The tool-call quickstart on it (recipes/quickstart-tools-llama3.yaml), trained, merged and served
with vLLM's llama3_json parser, is tested whole in tests/serving/backends/test_vllm_cpu.py (make
test-vllm); its responses found by rendering in tests/training/data/test_chat_tokens.py."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers, supports_tool_calling

from serving.tool_calls import template_parser
from training.model.tiny import LLAMA3_TEMPLATE, LLAMA3_TOKENS


def test_it_has_llama31s_tokens_and_template(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "llama3")
    # BOS in front of plain text, none added to a chat (the template writes it); <|eot_id|> ends a turn.
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in LLAMA3_TOKENS)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat["input_ids"].count(tokenizer.bos_token_id) == 1
    # Llama 3.1's own template, byte for byte: it renders tool calls, marks no responses, and TRL has
    # no training version of it.
    assert tokenizer.chat_template == LLAMA3_TEMPLATE.read_text(encoding="utf-8")
    assert supports_tool_calling(tokenizer) and not has_generation_markers(tokenizer.chat_template)
    with pytest.raises(ValueError, match="not supported"):
        get_training_chat_template(tokenizer)
    assert template_parser(tokenizer.chat_template) == "llama3_json"
    config = json.loads((tiny_dir / "llama3" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 1
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
