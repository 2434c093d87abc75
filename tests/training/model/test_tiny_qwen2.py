"""tiny://qwen2: shaped as Qwen2.5-Instruct comes, so the model's own template and tool calls run offline."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.chat_template_utils import get_training_chat_template, supports_tool_calling

from tests.conftest import ROOT, read_run
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


@pytest.mark.slow
def test_the_tools_quickstart_trains_merges_and_writes_a_tool_call(tools_run):
    """The shipped tool-call recipe, whole (tools_run: trained, merged and verified against base +
    adapter, with the biases of q, k and v that LoRA leaves alone): the model learned to write
    Qwen2.5's call for a training prompt."""
    assert read_run(tools_run)["data"]["train"]["rows_with_tools"] > 0
    merged = tools_run / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    row = json.loads((ROOT / "data" / "tool_calls.jsonl").read_text(encoding="utf-8").splitlines()[0])
    prompt = tokenizer.apply_chat_template(
        row["messages"][:1],
        tools=row["tools"],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    answer = tokenizer.decode(out[0][prompt["input_ids"].shape[1] :])
    assert answer.startswith(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>'
    ), answer
