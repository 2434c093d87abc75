"""Which tool-call parser vLLM starts with, told from the chat template the model is served with."""

from __future__ import annotations

from pathlib import Path

import pytest
import trl

from serving.tool_calls import AUTO, OFF, choose, template_parser
from training.data.templates import BUILTIN_TEMPLATES

# The chat templates TRL ships (its chat_templates/ folder): copies of the models' own.
MODEL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"


def model_template(name: str) -> str:
    return (MODEL_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("model", "parser"),
    [
        ("qwen2_5", "hermes"),  # <tool_call>{"name": ..., "arguments": ...}</tool_call>
        ("qwen3", "hermes"),
        ("qwen3_instruct_2507", "hermes"),
        # XML calls; its system preamble describes <function=...> too, which is not a call
        ("qwen3_5_nothink", "qwen3_coder"),
        ("qwen3_6", "qwen3_coder"),
        ("llama3_1", "llama3_json"),  # {"name": ..., "parameters": ...}
        ("llama3_2", "llama3_json"),
        ("llama3", None),  # Llama 3's template drops tool calls
        ("gemma3", None),
        ("glm4moe", None),  # a format of its own: chosen by name (TOOL_CALL_PARSER=glm45)
    ],
)
def test_the_parser_is_the_one_for_the_calls_the_template_writes(model, parser):
    assert template_parser(model_template(model)) == parser


def test_the_projects_own_templates_write_no_tool_calls():
    for name, template in BUILTIN_TEMPLATES.items():
        assert template_parser(template.chat_template(add_bos=True)) is None, name
    assert template_parser(None) is None and template_parser("") is None


def test_a_template_that_refuses_tool_calls_or_cannot_render_has_none():
    refusing = (
        "{% for m in messages %}{% if m.tool_calls %}{{ raise_exception('no tools here') }}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    assert template_parser(refusing) is None
    assert template_parser("{{ messages[0].content | no_such_filter }}") is None


def test_auto_none_or_a_name_of_vllms():
    qwen = model_template("qwen2_5")
    assert choose(None, qwen) == choose(AUTO, qwen) == "hermes"
    assert choose(OFF, qwen) is None
    assert choose("qwen3_xml", qwen) == "qwen3_xml"  # a name is taken as given
    assert choose("glm45", None) == "glm45"
    with pytest.raises(
        ValueError, match=r"unknown tool-call parser 'hermess'; 'auto' .*'none', or one of vLLM's: .*hermes"
    ):
        choose("hermess", qwen)
