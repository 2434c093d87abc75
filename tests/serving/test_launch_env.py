"""Launch settings for TGI and vLLM, derived from the merged quickstart model and checked before start."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import trl

from serving.backends.base import LaunchError
from serving.backends.tgi import plan_multi_lora
from serving.cli import main
from serving.launch_env import gpu_count, plan_from_env, plan_merged
from serving.model_dir import ModelDir, ModelDirError


@pytest.fixture
def model_copy(merged_model, tmp_path) -> Path:
    """A copy of the merged model to break on purpose, at outputs/quickstart/merged."""
    target = tmp_path / "outputs" / "quickstart" / "merged"
    shutil.copytree(merged_model, target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_limits_come_from_the_recipes_max_length(merged_model):
    settings = plan_merged(merged_model, "tgi", num_shard=1)
    assert (settings.max_total_tokens, settings.max_input_tokens) == (256, 255)
    assert "data.max_length" in settings.context_source and settings.run == "quickstart"
    assert settings.env() == {
        "RUN": "quickstart",
        "NUM_SHARD": "1",
        "MAX_INPUT_TOKENS": "255",
        "MAX_TOTAL_TOKENS": "256",
    }
    assert any("float32" in w for w in settings.warnings)  # TGI would serve it in float16


def test_explicit_limits_are_checked_against_the_model(merged_model):
    settings = plan_merged(merged_model, "vllm", num_shard=1, max_total_tokens=1024, max_input_tokens=1000)
    assert (settings.max_total_tokens, settings.max_input_tokens) == (1024, 1000)
    with pytest.raises(ModelDirError, match="more than the model's 2048 positions"):
        plan_merged(merged_model, "vllm", num_shard=1, max_total_tokens=4096)
    with pytest.raises(LaunchError, match=r"MAX_INPUT_TOKENS must be in \[1, 255\]"):
        plan_merged(merged_model, "tgi", num_shard=1, max_input_tokens=256)


@pytest.mark.parametrize("backend", ["tgi", "vllm"])
def test_shards_must_divide_the_attention_heads(merged_model, backend):
    assert plan_merged(merged_model, backend, num_shard=2).num_shard == 2
    with pytest.raises(
        LaunchError, match="2 attention heads and 2 key/value heads do not divide over 3 GPUs.*one of 1, 2"
    ):
        plan_merged(merged_model, backend, num_shard=3)
    with pytest.raises(LaunchError, match="NUM_SHARD must be >= 1"):
        plan_merged(merged_model, backend, num_shard=0)


def test_tgi_needs_the_chat_template_in_tokenizer_config(model_copy):
    edit_json(model_copy / "tokenizer_config.json", chat_template=None)
    with pytest.raises(
        LaunchError,
        match=r"chat template: no chat_template in tokenizer_config.json \(TGI 3.3.7 does not read",
    ):
        plan_merged(model_copy, "tgi", num_shard=1)
    assert plan_merged(model_copy, "vllm", num_shard=1).max_total_tokens == 256  # vLLM reads the .jinja


def test_tgi_refuses_what_its_transformers_4_cannot_read(model_copy):
    edit_json(model_copy / "tokenizer_config.json", tokenizer_class="TokenizersBackend")
    edit_json(
        model_copy / "config.json",
        rope_theta=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    with pytest.raises(LaunchError) as e:
        plan_merged(model_copy, "tgi", num_shard=1)
    assert "tokenizer class: TokenizersBackend is unknown" in str(e.value)
    assert "rope: rope_theta 1000000.0 only under rope_parameters" in str(e.value)


def test_a_directory_with_adapter_config_is_refused(model_copy, quickstart_run):
    shutil.copy(quickstart_run / "adapter" / "adapter_config.json", model_copy)
    with pytest.raises(LaunchError, match="TGI takes such a directory for an adapter"):
        plan_merged(model_copy, "tgi", num_shard=1)


def test_quantize_and_dtype(model_copy):
    assert plan_merged(model_copy, "tgi", num_shard=1, quantize="bitsandbytes-nf4").dtype is None
    with pytest.raises(LaunchError, match="not a TGI 3.3.7 method; choose one of: awq"):
        plan_merged(model_copy, "tgi", num_shard=1, quantize="nf4")
    with pytest.raises(LaunchError, match="does not combine --dtype with --quantize"):
        plan_merged(model_copy, "tgi", num_shard=1, quantize="eetq", dtype="float16")
    with pytest.raises(LaunchError, match="QUANTIZE applies to TGI only"):
        plan_merged(model_copy, "vllm", num_shard=1, quantize="awq")
    edit_json(model_copy / "config.json", dtype="bfloat16", torch_dtype=None)
    assert plan_merged(model_copy, "tgi", num_shard=1).env()["DTYPE"] == "bfloat16"  # TGI would pick float16


def test_directories_that_are_not_merged_models(quickstart_run, tmp_path):
    with pytest.raises(ModelDirError, match="merge it first"):
        ModelDir.open(quickstart_run / "adapter")
    with pytest.raises(ModelDirError, match="no such directory.*make merge"):
        ModelDir.open(tmp_path / "nothing")


def test_multi_lora_on_the_tiny_llama(quickstart_run, tiny_dir):
    adapters = f"quickstart={quickstart_run / 'adapter'}"
    settings = plan_multi_lora(str(tiny_dir / "llama"), adapters, num_shard=1)
    assert (settings.run, settings.max_total_tokens) == ("quickstart", 256)
    # TGI formats chat with the base model's template (the tiny Llama has none), not the adapter's.
    assert any("TGI 3.3.7 formats chat with" in w and "adapter quickstart" in w for w in settings.warnings)
    with pytest.raises(LaunchError, match="applies LoRA adapters for .*llama.* only.*'gpt_neox'"):
        plan_multi_lora(str(tiny_dir / "gpt-neox"), adapters, num_shard=1)


def test_dora_adapters_cannot_be_served_unmerged(quickstart_run, tiny_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(quickstart_run / "adapter", adapter)
    edit_json(adapter / "adapter_config.json", use_dora=True)
    with pytest.raises(LaunchError, match="DoRA"):
        plan_multi_lora(str(tiny_dir / "llama"), f"a={adapter}", num_shard=1)


def test_plan_from_env_needs_both_lora_settings(merged_model):
    outputs = merged_model.parent.parent
    with pytest.raises(LaunchError, match="needs both LORA_BASE_MODEL"):
        plan_from_env("tgi", num_shard=1, outputs=outputs, env={"LORA_ADAPTERS": "a=/outputs/a/adapter"})
    with pytest.raises(LaunchError, match="no such directory.*RUN=missing"):
        plan_from_env("tgi", num_shard=1, outputs=outputs, env={"RUN": "missing"})
    assert plan_from_env("vllm", num_shard=None, outputs=outputs, env={"NUM_SHARD": "2"}).num_shard == 2


def test_empty_optional_settings_are_refused_for_tgi(merged_model):
    outputs = merged_model.parent.parent
    with pytest.raises(LaunchError, match="API_KEY, QUANTIZE set but empty"):
        plan_from_env("tgi", num_shard=1, outputs=outputs, env={"QUANTIZE": "", "API_KEY": " "})
    assert plan_from_env("vllm", num_shard=1, outputs=outputs, env={"API_KEY": ""}).max_total_tokens == 256


def test_launch_env_prints_settings_a_shell_can_eval(merged_model, capsys, monkeypatch):
    monkeypatch.setenv("RUN", "quickstart")
    monkeypatch.delenv("TOOL_CALL_PARSER", raising=False)
    assert (
        main(
            [
                "launch-env",
                "--backend",
                "vllm",
                "--num-shard",
                "2",
                "--outputs",
                str(merged_model.parent.parent),
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    exports = dict(shlex.split(line)[1].split("=", 1) for line in out.splitlines())
    assert exports == {
        "RUN": "quickstart",
        "NUM_SHARD": "2",
        "MAX_INPUT_TOKENS": "255",
        "MAX_TOTAL_TOKENS": "256",
        # The quickstart's template (dolly-ja) writes no tool calls: vLLM refuses requests with tools.
        "VLLM_TOOL_CHOICE": "no-enable-auto-tool-choice",
        "TOOL_CALL_PARSER": "hermes",
    }
    assert "256 tokens per request" in err
    assert (
        main(
            [
                "launch-env",
                "--backend",
                "tgi",
                "--num-shard",
                "3",
                "--outputs",
                str(merged_model.parent.parent),
            ]
        )
        == 2
    )
    assert "set NUM_SHARD to one of 1, 2" in capsys.readouterr().err


def test_vllm_reads_tool_calls_as_the_models_chat_template_writes_them(model_copy, capsys):
    # A model fine-tuned on tool calls with Qwen2.5's own template (data.template: model).
    qwen = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")
    (model_copy / "chat_template.jinja").write_text(qwen, encoding="utf-8")
    outputs = model_copy.parent.parent
    settings = plan_from_env("vllm", num_shard=1, outputs=outputs, env={})
    env = settings.env()
    assert (env["VLLM_TOOL_CHOICE"], env["TOOL_CALL_PARSER"]) == ("enable-auto-tool-choice", "hermes")
    assert settings.notes == [
        "tool calls: requests may offer tools; vLLM reads the model's calls as hermes (from the chat template)"
    ]
    chosen = plan_from_env("vllm", num_shard=1, outputs=outputs, env={"TOOL_CALL_PARSER": "qwen3_xml"})
    assert chosen.env()["TOOL_CALL_PARSER"] == "qwen3_xml" and "(chosen)" in chosen.notes[0]
    off = plan_from_env("vllm", num_shard=1, outputs=outputs, env={"TOOL_CALL_PARSER": "none"})
    assert off.env()["VLLM_TOOL_CHOICE"] == "no-enable-auto-tool-choice" and not off.notes
    # TGI reads tool calls with its own grammar, for any model: nothing to set.
    assert "TOOL_CALL_PARSER" not in plan_from_env("tgi", num_shard=1, outputs=outputs, env={}).env()
    # A misspelt name stops before the minutes of loading, where vLLM would take it and fail loaded.
    with pytest.raises(LaunchError, match="TOOL_CALL_PARSER: unknown tool-call parser 'hermess'"):
        plan_from_env("vllm", num_shard=1, outputs=outputs, env={"TOOL_CALL_PARSER": "hermess"})


def test_launch_env_says_llamacpp_runs_on_the_cpu(merged_model, capsys, monkeypatch):
    outputs = merged_model.parent.parent
    gguf = outputs / merged_model.parent.name / "gguf" / f"{merged_model.parent.name}-q4_k_m.gguf"
    gguf.parent.mkdir(exist_ok=True)
    gguf.touch()
    monkeypatch.setenv("RUN", merged_model.parent.name)
    assert main(["launch-env", "--backend", "llamacpp", "--outputs", str(outputs)]) == 0
    out, err = capsys.readouterr()
    assert "on the CPU, 256 tokens per request" in err and "GPU" not in err
    # The server derives the recipe's limit itself and says so (--max-model-len auto in compose), unless
    # MAX_TOTAL_TOKENS is set.
    assert "MAX_TOTAL_TOKENS" not in out and f"export RUN={merged_model.parent.name}" in out
    monkeypatch.setenv("MAX_TOTAL_TOKENS", "128")
    assert main(["launch-env", "--backend", "llamacpp", "--outputs", str(outputs)]) == 0
    out, err = capsys.readouterr()
    assert "export MAX_TOTAL_TOKENS=128" in out and "128 tokens per request" in err


def test_gpu_count_without_gpus(monkeypatch):
    assert gpu_count() >= 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_count() == 0
