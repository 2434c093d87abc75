"""Tool calls on the local server: transformers serve renders a request's tools and returns the
model's calls as tool_calls where it can parse them, and the banner says which it is."""

from __future__ import annotations

import json

import openai
import pytest

from serving.local_server.app import tool_call_note
from serving.model_dir import ModelDir
from tests.conftest import ROOT
from tests.serving.conftest import API_KEY, ServerProcess
from tests.serving.test_tool_calls import model_template
from training.data.templates import BUILTIN_TEMPLATES

PARSED = "transformers serve returns the model's calls as tool_calls"


def model_dir(tmp_path, model_type: str, template: str, **tokenizer_config) -> ModelDir:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    config = {"chat_template": template, **tokenizer_config}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return ModelDir.open(tmp_path)


@pytest.mark.parametrize(("model_type", "template"), [("qwen2", "qwen2_5"), ("qwen3", "qwen3")])
def test_qwen_calls_are_parsed(tmp_path, model_type, template):
    assert PARSED in tool_call_note(model_dir(tmp_path, model_type, model_template(template)))


def test_calls_transformers_cannot_parse_are_said_to_come_back_as_text(tmp_path):
    llama = model_dir(tmp_path, "llama", model_template("llama3_1"))
    note = tool_call_note(llama)
    assert "cannot parse the calls this llama model writes" in note and "SERVE_BACKEND=vllm" in note
    # A response template of the tokenizer's own is what transformers serve parses with.
    schema = {"fields": {"content": {"content": "text"}}}
    assert PARSED in tool_call_note(
        model_dir(tmp_path, "llama", model_template("llama3_1"), response_template=schema)
    )


def test_templates_that_write_no_calls_get_no_note(tmp_path):
    for name, template in BUILTIN_TEMPLATES.items():
        assert tool_call_note(model_dir(tmp_path, "llama", template.chat_template(add_bos=True))) is None, (
            name
        )
    assert tool_call_note(model_dir(tmp_path, "llama", model_template("llama3"))) is None  # drops calls


def test_a_model_trained_on_tool_calls_answers_with_tool_calls(tools_run):
    """The tool-call quickstart, trained and merged, on the local server: a chat that offers tools is
    answered with the call the model writes, as tool_calls, streamed or not."""
    server = ServerProcess(tools_run / "merged", "--backend", "local", env={"API_KEY": API_KEY})
    row = json.loads((ROOT / "data" / "tool_calls.jsonl").read_text(encoding="utf-8").splitlines()[0])
    request = {
        "model": "quickstart-tools",
        "messages": row["messages"][:1],  # What's the weather like in Seoul right now?
        "tools": row["tools"],
        "max_tokens": 40,
        "temperature": 0,
    }
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
        answer = client.chat.completions.create(**request)
        chunks = list(client.chat.completions.create(**request, stream=True))
    finally:
        server.stop()
    assert PARSED in "".join(server.output)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Seoul"})
    streamed = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed] == [
        ("get_weather", {"city": "Seoul"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
