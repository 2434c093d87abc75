"""The Ollama Modelfile beside a GGUF: it parses as Ollama parses it, and its Go template renders
every conversation exactly as the model's Jinja chat template does (less BOS, which Ollama adds)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.training.merge.ollama_modelfile import ModelfileSyntaxError, create_request, parse
from training.data.templates import BUILTIN_TEMPLATES, PromptTemplate, parse_custom_template
from training.merge.modelfile import ModelfileError, build_modelfile, go_template

GO_RENDERER = Path(__file__).with_name("ollama_render.go")
TEMPLATES = {
    **BUILTIN_TEMPLATES,
    "custom": parse_custom_template("### 質問: {instruction}\n### 文脈: {input}\n### 回答: {output}"),
    # Literal braces ({{ in a Go template starts an action) and a trailing space in the prompt.
    "braces": PromptTemplate(name="braces", user_prefix="[[{{sys}}]] ", assistant_prefix="\n=> "),
}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "日本の首都は?"}],
    "user-assistant-user": [
        {"role": "user", "content": "김치찌개 끓이는 법?"},
        {"role": "assistant", "content": "김치를 볶고 물을 붓습니다."},
        {"role": "user", "content": "Thanks. And {{ .Prompt }}?"},
    ],
    "system-user": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Why is the sea blue?"},
    ],
}


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Ollama's template execution (ollama_render.go), compiled once."""
    if shutil.which("go") is None:
        pytest.skip("needs Go (apt-get install golang-go) to run Go's text/template as Ollama does")
    binary = tmp_path_factory.mktemp("go") / "ollama_render"
    subprocess.run(["go", "build", "-o", str(binary), str(GO_RENDERER)], check=True, timeout=600)
    return lambda template, messages: _render(binary, template, messages)


def _render(binary: Path, template: str, messages: list[dict]) -> str:
    result = subprocess.run(
        [str(binary)],
        input=json.dumps({"template": template, "messages": messages}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("add_bos", [True, False], ids=["bos", "no-bos"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_go_template_renders_every_conversation_as_the_jinja_template_does(
    go_render, llama_tokenizer, name, add_bos
):
    template = TEMPLATES[name]
    jinja = template.chat_template(add_bos=add_bos)
    go, _ = go_template(template, llama_tokenizer.eos_token)
    for conversation, messages in CONVERSATIONS.items():
        if messages[0]["role"] == "system" and template.system_prefix is None:
            with pytest.raises(Exception, match="no place for a system message"):
                llama_tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False)
            continue
        expected = llama_tokenizer.apply_chat_template(
            messages, chat_template=jinja, tokenize=False, add_generation_prompt=True
        )
        if add_bos:  # Ollama's runner adds BOS itself, as the GGUF's add_bos_token says
            expected = expected.removeprefix(llama_tokenizer.bos_token)
        assert go_render(go, messages) == expected, (name, conversation)


def test_the_modelfile_parses_as_ollama_reads_it_and_names_the_gguf_template_and_stops():
    template = BUILTIN_TEMPLATES["dolly-ja"]
    modelfile = build_modelfile("quickstart-q4_k_m.gguf", template, "dolly-ja", "</s>", 256)
    request = create_request(modelfile.text)
    assert request.from_ == "./quickstart-q4_k_m.gguf"
    assert request.template == modelfile.template == go_template(template, "</s>")[0]
    assert "ユーザー:{{ .Content }}" in request.template and request.template.endswith("\nシステム:")
    assert request.parameters == {"stop": ["</s>", "ユーザー:"], "num_ctx": ["256"]}
    assert modelfile.stops == ("</s>", "ユーザー:")


@pytest.mark.parametrize(
    ("name", "stops"),
    [
        ("koalpaca", ["</s>", "<usr>"]),
        ("alpaca", ["</s>", "### Instruction:"]),
        ("custom", ["</s>", "### 質問:"]),
    ],
)
def test_each_template_stops_at_eos_and_at_the_next_user_turn(name, stops):
    request = create_request(build_modelfile("m.gguf", TEMPLATES[name], name, "</s>", None).text)
    assert request.parameters == {"stop": stops}


def test_a_base_models_own_template_is_not_translated_and_the_file_says_why():
    modelfile = build_modelfile("m.gguf", None, "model", "<|im_end|>", 4096)
    request = create_request(modelfile.text)
    assert request.template is None and modelfile.template is None
    assert request.parameters == {"stop": ["<|im_end|>"], "num_ctx": ["4096"]}
    assert "template: model" in modelfile.text and "No TEMPLATE" in modelfile.text
    assert modelfile.notes == ["the base model's own chat template (template: model) is not translated to Go"]


def test_a_template_a_modelfile_value_cannot_hold_is_refused():
    with pytest.raises(ModelfileError, match='contains """'):
        build_modelfile(
            "m.gguf", parse_custom_template('Q: {instruction}\n""" A: {output}'), "x", "</s>", None
        )
    with pytest.raises(ModelfileError, match="drops"):
        build_modelfile(
            "m.gguf", parse_custom_template("Q\x07: {instruction}\nA: {output}"), "x", "</s>", None
        )


def test_the_parser_stand_in_refuses_what_ollama_refuses():
    with pytest.raises(ModelfileSyntaxError, match="no FROM"):
        parse('TEMPLATE "x"\n')
    with pytest.raises(ModelfileSyntaxError, match="command must be one of"):
        parse("FROM ./m.gguf\nSTOP x\n")
    with pytest.raises(ModelfileSyntaxError, match="end of file"):
        parse('FROM ./m.gguf\nTEMPLATE """never closed\n')
    assert parse('# c\nfrom ./m.gguf\nPARAMETER stop "a b"\nMESSAGE user hi there\n') == [
        ("model", "./m.gguf"),
        ("stop", "a b"),
        ("message", "user: hi there"),
    ]
