"""llama.cpp's server (llama-cpp-python) on the GGUF export of the quickstart run, and its backend.

The export-marked tests start `python -m serving serve --backend llamacpp` for real on the f32
export, whose greedy answers equal the merged model's (the export's own verification says so),
so every answer can be checked against transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoTokenizer

from serving import llamacpp_server
from serving.backends import BACKENDS
from serving.backends.base import LaunchError
from serving.backends.llamacpp import LlamaCpp
from serving.bench import main as bench_main
from serving.client import ServingClient
from serving.errors import InvalidParameterError, RequestRejectedError
from serving.launch_env import plan_from_env, shell
from serving.model_dir import ModelDirError
from serving.params import SamplingParams
from tests.conftest import ROOT
from tests.serving.conftest import API_KEY, ServerProcess
from tests.serving.test_tool_calls import model_template
from training.data.templates import BUILTIN_TEMPLATES

export = pytest.mark.export
LLAMA_CPP_MODELS = {
    "object": "list",
    "data": [{"id": "quickstart", "object": "model", "owned_by": "me", "permissions": []}],
}
PROMPT = "ユーザー:日本で一番長い川は何ですか？\nシステム:"
QUESTION = "日本で一番長い川は何ですか？"


# --- the backend, without a server ------------------------------------------------------------


def test_its_models_listing_is_recognised_and_no_other_servers_is():
    backend = BACKENDS["llamacpp"]
    info = backend.from_models("http://h", LLAMA_CPP_MODELS)
    assert (info.backend, info.name, info.model, info.max_total_tokens) == (
        "llamacpp",
        "llama.cpp",
        "quickstart",
        None,
    )
    vllm = {"data": [{"id": "q", "owned_by": "vllm", "max_model_len": 256}]}
    local = {"data": [{"id": "q", "owned_by": "qlora-stack", "max_model_len": 256}]}
    someone = {"data": [{"id": "q", "owned_by": "me"}]}  # "me" without llama-cpp-python's permissions list
    assert all(backend.from_models("http://h", m) is None for m in (vllm, local, someone))
    # Registered before the catch-all "openai", which would take any listing.
    names = list(BACKENDS)
    assert names.index("llamacpp") < names.index("openai")


def test_requests_say_every_knob_whose_llama_cpp_default_would_change_the_answer():
    backend = LlamaCpp()
    greedy = backend.raw_fields(SamplingParams(max_new_tokens=8))
    # Its repeat_penalty default (1.1) applies to greedy decoding too.
    assert greedy == {"max_tokens": 8, "temperature": 0.0, "repeat_penalty": 1.0}
    sampled = backend.raw_fields(SamplingParams(max_new_tokens=8, temperature=0.7, seed=3))
    assert sampled == {
        "max_tokens": 8,
        "temperature": 0.7,
        "seed": 3,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
    }
    chosen = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.3, stop=["\n"])
    raw = backend.raw_fields(chosen)
    assert (raw["top_p"], raw["top_k"], raw["repeat_penalty"], raw["stop"]) == (0.9, 5, 1.3, ["\n"])
    assert "repetition_penalty" not in raw
    chat = backend.chat_fields(chosen)
    assert chat["top_p"] == 0.9 and chat["extra_body"] == {"repeat_penalty": 1.3, "top_k": 5, "min_p": 0.0}
    assert backend.chat_fields(SamplingParams())["extra_body"] == {"repeat_penalty": 1.0}


def fake_run(outputs: Path, run: str = "quickstart", quant: str = "q4_k_m") -> None:
    """outputs/<run>/merged with its recipe's max_length, and an (empty) export file."""
    merged = outputs / run / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    (merged / "model.safetensors").write_bytes(b"")
    (merged / "merge.json").write_text(json.dumps({"recipe": {"data": {"max_length": 256}}}))
    (outputs / run / "gguf").mkdir()
    (outputs / run / "gguf" / f"{run}-{quant}.gguf").write_bytes(b"")


def test_launch_settings_take_the_merged_models_limits_and_need_the_export(tmp_path):
    fake_run(tmp_path)
    settings = plan_from_env("llamacpp", num_shard=None, outputs=tmp_path, env={"RUN": "quickstart"})
    assert (settings.max_total_tokens, settings.max_input_tokens, settings.num_shard) == (256, 255, 1)
    # The server derives the same limit itself (--max-model-len auto) and names the recipe as its source.
    assert settings.context_source.startswith("the recipe") and "MAX_TOTAL_TOKENS" not in shell(settings)
    explicit = plan_from_env("llamacpp", num_shard=None, outputs=tmp_path, env={"MAX_TOTAL_TOKENS": "128"})
    assert "export MAX_TOTAL_TOKENS=128" in shell(explicit)
    with pytest.raises(
        LaunchError, match=r"quickstart-q8_0.gguf: no GGUF export .* `make export FORMAT=gguf QUANT=q8_0`"
    ):
        plan_from_env(
            "llamacpp", num_shard=None, outputs=tmp_path, env={"RUN": "quickstart", "GGUF_QUANT": "q8_0"}
        )
    with pytest.raises(LaunchError, match="API_KEY set but empty"):
        plan_from_env("llamacpp", num_shard=None, outputs=tmp_path, env={"RUN": "quickstart", "API_KEY": " "})


def test_an_export_is_served_under_its_models_name_with_that_models_limits(tmp_path):
    fake_run(tmp_path)
    run = llamacpp_server.settings_for(outputs=tmp_path, run="quickstart")
    assert (run.served_name, run.n_ctx) == ("quickstart", 256)
    # `export --merged models/my-llama` writes models/gguf/my-llama-q8_0.gguf beside models/merged of
    # another model: the name and the limits are my-llama's.
    fake_run(tmp_path, "models")
    model = tmp_path / "models" / "my-llama"
    shutil.copytree(tmp_path / "models" / "merged", model)
    (model / "merge.json").write_text(json.dumps({"recipe": {"data": {"max_length": 512}}}))
    gguf = tmp_path / "models" / "gguf" / "my-llama-q8_0.gguf"
    gguf.write_bytes(b"")
    gguf.with_name("my-llama-q8_0.export.json").write_text(json.dumps({"quant": "q8_0"}))
    other = llamacpp_server.settings_for(outputs=tmp_path, run="quickstart", gguf=gguf)
    assert (other.served_name, other.n_ctx) == ("my-llama", 512)
    # A record cut short is named, not a traceback.
    gguf.with_name("my-llama-q8_0.export.json").write_text('{"quant": "q8')
    with pytest.raises(ModelDirError, match=r"my-llama-q8_0\.export\.json: cannot read it as JSON"):
        llamacpp_server.settings_for(outputs=tmp_path, run="quickstart", gguf=gguf)


@export  # rendered with llama-cpp-python's own renderer, which only the export extra installs
def test_the_banner_says_how_tool_calls_come_back_for_the_form_the_template_writes_them_in():
    for template, form in (
        ("qwen2_5", "<tool_call> calls (Hermes form)"),  # <tool_call>{"name": ...}</tool_call>: parsed
        ("qwen3", "<tool_call> calls (Hermes form)"),
        ("llama3_1", "JSON calls (Llama 3.1's form)"),  # {"name": ..., "parameters": ...}: parsed
    ):
        note = llamacpp_server.tool_call_note(model_template(template))
        assert f"{form} come back as tool_calls" in note and "as text" not in note, template
    note = llamacpp_server.tool_call_note(model_template("qwen3_6"))  # Qwen3-Coder's XML: not parsed
    assert "calls as text in content" in note and "SERVE_BACKEND=vllm or local" in note
    for name, template in BUILTIN_TEMPLATES.items():  # no place for tools
        assert llamacpp_server.tool_call_note(template.chat_template(add_bos=True)) is None, name
    assert llamacpp_server.tool_call_note(model_template("llama3")) is None  # drops calls
    assert llamacpp_server.tool_call_note(None) is None


# --- the real server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_server(quickstart_gguf):
    run, result = quickstart_gguf
    assert result.returncode == 0, result.stderr
    # Variables llama-cpp-python's settings would read from the environment if it were asked to:
    # the server must take this project's settings, not these.
    decoys = {
        "API_KEY": API_KEY,
        "MODEL": "/nonexistent.gguf",
        "N_CTX": "16",
        "PORT": "1",
        "MODEL_ALIAS": "x",
    }
    server = ServerProcess(run / "merged", "--backend", "llamacpp", "--quant", "f32", env=decoys)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(quickstart_gguf):
    """The merged model, loaded by transformers: what greedy decoding must give."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = quickstart_gguf[0] / "merged"
    return AutoModelForCausalLM.from_pretrained(merged).eval(), AutoTokenizer.from_pretrained(merged)


def greedy(reference, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    model, tokenizer = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens)
    new = out[0, len(ids) :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def shown(text: str) -> str:
    """Text as llama.cpp returns it: it never sends the bytes of an unfinished character, which a
    full decode shows as U+FFFD (the random tiny model often stops mid-character)."""
    return text.replace("\ufffd", "")


@pytest.fixture(scope="module")
def client(llama_server):
    with ServingClient(llama_server.url, api_key=API_KEY) as c:
        yield c


@export
def test_it_serves_the_run_under_its_name_with_the_recipes_context(llama_server, client):
    info = client.info
    assert (info.backend, info.name, info.model) == ("llamacpp", "llama.cpp", "quickstart")
    assert "limit   256 tokens per request" in "".join(llama_server.output)
    assert client.health()  # no /health: ready once /v1/models answers


@export
def test_generate_and_stream_give_the_merged_models_greedy_answer(client, reference):
    ids = reference[1](PROMPT)["input_ids"]
    expected, n = greedy(reference, ids, 12)
    # llama-cpp-python (0.3.36, Llama._create_completion) does not stop inside a UTF-8 character:
    # when the last allowed token leaves one unfinished, it generates up to 3 more to finish it.
    longer, _ = greedy(reference, ids, 12 + 3)
    result = client.generate(PROMPT, max_new_tokens=12)
    text = shown(result.text)
    assert text.startswith(shown(expected)) and shown(longer).startswith(text)
    assert result.prompt_tokens == len(ids) and n <= result.generated_tokens <= n + 3
    assert len(text) - len(shown(expected)) <= 1  # at most the one character it finished
    streamed = shown("".join(c.text for c in client.stream(PROMPT, max_new_tokens=12)))
    assert streamed == text
    assert client.count_tokens(prompt=PROMPT) == len(ids)  # with BOS, as the completion counts it


@export
def test_chat_uses_the_template_carried_in_the_gguf(client, reference):
    tokenizer = reference[1]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]  # the template writes BOS
    expected, n = greedy(reference, ids, 10)
    result = client.chat(QUESTION, max_new_tokens=10)
    assert (shown(result.text), result.prompt_tokens, result.generated_tokens) == (
        shown(expected),
        len(ids),
        n,
    )
    assert client.count_tokens(messages=QUESTION) is None  # it cannot count a chat before rendering it


def check_answers_to_the_end_of_the_context(client: ServingClient, limit: int = 256) -> None:
    """The README's client example: a sampled stream with no max_new_tokens (512: the client cannot
    know the context), then a generate. llama-cpp-python capped such answers at exactly what the
    context left after the prompt, then went on for an unfinished UTF-8 character into a full KV
    cache: llama_decode failed, the stream was cut off (not streamed: a 500), and the next request
    on the connection was reset. A long prompt makes the answers reach the end quickly.

    At least 12 seeds, and more until one answer has run past the context to finish a character: which
    seeds do depends on the machine's llama.cpp kernels (seen: one in 40 on one machine, none of the
    first 12)."""
    prompt = "日本の首都はどこですか？" * 9 + PROMPT
    room = limit - client.count_tokens(prompt=prompt)
    finished_a_character = 0
    for seed in range(100):
        if seed >= 12 and finished_a_character:
            break
        chunks = list(client.stream(prompt, temperature=0.7, top_p=0.9, seed=seed))
        assert chunks[-1].finish_reason in ("length", "stop"), f"seed {seed}: the stream was cut off"
        assert client.generate(PROMPT, max_new_tokens=8).generated_tokens > 0
        full = client.generate(prompt, temperature=0.7, top_p=0.9, seed=seed)
        assert full.generated_tokens <= room + 3  # the recipe's limit, and 3 to finish a character
        finished_a_character += full.generated_tokens > room + 1  # what had no room in the KV cache
    assert finished_a_character, "no answer ran past the context to finish a character: nothing was tested"


@export
def test_answers_that_run_to_the_end_of_the_context_finish_and_the_server_answers_the_next_request(
    client, llama_server
):
    check_answers_to_the_end_of_the_context(client)
    assert "llama_decode returned" not in "".join(llama_server.output)


@export
def test_the_openai_package_and_sampling_with_a_seed(llama_server, client, reference):
    oai = openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key=API_KEY)
    assert [m.id for m in oai.models.list().data] == ["quickstart"]
    expected, _ = greedy(reference, reference[1](PROMPT)["input_ids"], 8)
    reply = oai.completions.create(
        model="quickstart", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"repeat_penalty": 1.0}
    )
    assert shown(reply.choices[0].text) == shown(expected)
    sampled = [client.chat(QUESTION, max_new_tokens=8, temperature=1.5, seed=s).text for s in range(3)]
    assert len(set(sampled)) > 1
    assert client.chat(QUESTION, max_new_tokens=8, temperature=1.5, seed=1).text == sampled[1]


@export
def test_the_key_is_required_and_an_oversized_prompt_is_refused_with_its_reason(llama_server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        request = urllib.request.Request(f"{llama_server.url}/v1/models", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401
    with pytest.raises(RequestRejectedError, match="maximum context length is 256 tokens") as e:
        client.generate("日本の首都はどこですか？" * 60, max_new_tokens=8)
    assert e.value.status == 400
    with pytest.raises(InvalidParameterError, match="serves one GGUF model"):
        client.chat(QUESTION, adapter_id="ko")


@export
def test_the_load_benchmark_runs_against_it(llama_server, tmp_path, monkeypatch):
    monkeypatch.setenv("API_KEY", API_KEY)
    out = tmp_path / "bench"
    args = ["--url", llama_server.url, "-n", "4", "-c", "1,2", "--max-new-tokens", "6", "--out", str(out)]
    assert bench_main([*args, "--no-progress"]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["server"]["backend"] == "llamacpp"
    for level in result["levels"]:
        assert (level["requests"], level["ok"], level["errors"]) == (4, 4, {})
        assert level["output_tokens"] > 0


@export
def test_a_missing_export_stops_the_server_with_the_command_that_makes_it(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "serve",
            "--backend",
            "llamacpp",
            "--outputs",
            str(tmp_path),
            "--run",
            "r",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "API_KEY": API_KEY},
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert (
        "r-q4_k_m.gguf: no such GGUF. Export the run first: make export FORMAT=gguf QUANT=q4_k_m"
        in done.stderr
    )


def streamed(stream) -> tuple[str, list[tuple[str, dict]], str]:
    """A streamed chat as the openai package delivers it: the content, the calls, the finish_reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            assert call.id.startswith("call_") and call.type == "function"
            calls[call.index] = (call.function.name, json.loads(call.function.arguments))
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def weather_answers(run: Path) -> dict:
    """A tool quickstart's GGUF on llama.cpp's server, asked data/tool_calls.jsonl's first question
    (What's the weather like in Seoul right now?) with its tools, greedily: the answers whole
    ("tools"), streamed ("stream"), without tools ("untooled") and with tool_choice none ("none"),
    the banner ("output"), and the prompt as transformers renders it ("rendered", its token count)."""
    server = ServerProcess(
        run / "merged", "--backend", "llamacpp", "--quant", "f32", env={"API_KEY": API_KEY}
    )
    row = json.loads((ROOT / "data" / "tool_calls.jsonl").read_text(encoding="utf-8").splitlines()[0])
    request = {"model": run.name, "messages": row["messages"][:1], "max_tokens": 40, "temperature": 0}
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
        answers = {
            "tools": client.chat.completions.create(**request, tools=row["tools"]),
            "stream": streamed(client.chat.completions.create(**request, tools=row["tools"], stream=True)),
            "untooled": client.chat.completions.create(**request),
            "none": client.chat.completions.create(**request, tools=row["tools"], tool_choice="none"),
        }
    finally:
        server.stop()
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    rendered = tokenizer.apply_chat_template(
        row["messages"][:1], tools=row["tools"], add_generation_prompt=True, tokenize=False
    )
    # Without special tokens added: a template that writes BOS itself (Llama 3.1's) has it in `rendered`.
    n_rendered = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return {**answers, "output": "".join(server.output), "rendered": n_rendered}


def assert_weather_call_comes_back(answers: dict) -> None:
    """The model's call, get_weather {"city": "Seoul"}, came back as tool_calls, streamed and not; the
    tools preamble was in the prompt (as long as transformers renders it); and without tools, or
    with tool_choice none, the answer is text, finish_reason stop."""
    answer, untooled, unparsed = answers["tools"], answers["untooled"], answers["none"]
    assert answer.usage.prompt_tokens == answers["rendered"] > untooled.usage.prompt_tokens
    choice = answer.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", None)
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Seoul"})
    ]
    assert calls[0].id.startswith("call_")
    assert answers["stream"] == ("", [("get_weather", {"city": "Seoul"})], "tool_calls")
    plain = untooled.choices[0]
    assert plain.finish_reason in ("stop", "length") and plain.message.tool_calls is None
    assert plain.message.content
    assert (unparsed.choices[0].finish_reason, unparsed.choices[0].message.tool_calls) == ("stop", None)
    assert "come back as tool_calls" in answers["output"]  # the banner says so


@export
def test_a_model_trained_on_tool_calls_gets_its_tools_and_its_calls_come_back_as_tool_calls(tools_gguf):
    """The tool-call quickstart's GGUF on llama.cpp's server, asked what the local server answers
    with tool_calls (tests/serving/local_server/test_tool_calls.py): llama-cpp-python 0.3.36 renders
    the request's tools through the GGUF's template (Jinja2ChatFormatter), so the trained model
    writes its call in the Hermes form, which llama-cpp-python parses not but this server does
    (serving.hermes_calls): tool_calls and finish_reason tool_calls, streamed or not."""
    run, result = tools_gguf
    assert result.returncode == 0, result.stderr
    answers = weather_answers(run)
    assert_weather_call_comes_back(answers)
    assert "<tool_call>" not in answers["untooled"].choices[0].message.content
    # tool_choice "none": the calls the model writes anyway stay text, as llama-cpp-python returns them.
    assert answers["none"].choices[0].message.content == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>'
    )


@export
def test_a_model_trained_on_llama3_tool_calls_gets_its_calls_back_as_tool_calls(llama3_tools_gguf):
    """The same on Llama 3.1's form (recipes/quickstart-tools-llama3.yaml, tiny://llama3): the trained
    model writes its call as bare JSON, `{"name": "get_weather", "parameters": {"city": "Seoul"}}`,
    which this server reads as vLLM's llama3_json parser does (serving.llama3_calls)."""
    run, result = llama3_tools_gguf
    assert result.returncode == 0, result.stderr
    answers = weather_answers(run)
    assert_weather_call_comes_back(answers)
    assert "JSON calls (Llama 3.1's form) come back as tool_calls" in answers["output"]
    assert answers["none"].choices[0].message.content == (
        '{"name": "get_weather", "parameters": {"city": "Seoul"}}'
    )
