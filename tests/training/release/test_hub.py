"""Publishing: the upload folder, the model card, and push without the Hub."""

from __future__ import annotations

import errno
import json
import resource
import shutil
import subprocess
import sys

import pytest

from training.release.hub import build_upload_folder
from training.release.model_card import build_card


def test_upload_folder_and_card_name_base_model_and_data(quickstart_run, both_bases, tmp_path):
    from huggingface_hub import ModelCard

    out, _ = both_bases
    folder = build_upload_folder(quickstart_run, "adapter", "someone/quickstart-lora")
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "run.json"} <= names
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft" and "qlora" in card.data.tags
    assert "tiny://llama" in card.text and "data/ja_dolly.jsonl" in card.text and "dolly-ja" in card.text
    assert "--lora-adapters quickstart-lora=someone/quickstart-lora" in card.text  # TGI multi-LoRA
    assert "vllm/vllm-openai" in card.text and "/v1/chat/completions" in card.text


def test_card_metadata_names_hub_base_model_and_dataset():

    run = json.loads(json.dumps(SAMPLE_RUN))
    card = build_card("merged", "me/ko-llama", run, None, None)
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert card.data.datasets == ["heegyu/open-korean-instructions"]
    assert "--model-id me/ko-llama --num-shard 1" in card.text


def test_card_shows_lm_eval_scores_and_perplexity_where_measured():
    evaluation = {
        "source": "data/ja_dolly.jsonl",
        "rows": 8,
        "prompts": 0,
        "models": {
            "base": {
                "perplexity": 2880.4,
                "harness": {"kobest": {"acc": 0.5, "acc_stderr": 0.01, "samples": 9}},
            },
            "server quickstart": {"url": "http://127.0.0.1:8000", "harness": {"kobest": {"f1": 0.25}}},
        },
        "harness": {"tasks": ["kobest"], "limit": None, "lm_eval_version": "0.4.13"},
    }
    card = build_card("merged", "me/ko-llama", json.loads(json.dumps(SAMPLE_RUN)), None, evaluation)
    assert (
        "| base | 2880.400 |" in card.text and "| server quickstart | " not in card.text.split("lm-eval")[0]
    )
    assert "lm-evaluation-harness 0.4.13" in card.text
    assert "| base | acc 0.500 |" in card.text and "| server quickstart | f1 0.250 |" in card.text


def test_push_without_the_hub_leaves_the_folder_ready(quickstart_run, tmp_path):
    token = tmp_path / "token"
    token.write_text("hf_not_a_real_token\n")
    cmd = [
        sys.executable,
        "-m",
        "training",
        "push",
        "--set",
        f"output.dir={quickstart_run.parent}",
        "--what",
        "adapter",
        "--repo-id",
        "someone/x",
        "--token-file",
        str(token),
    ]
    offline = subprocess.run(cmd, capture_output=True, text=True)
    assert offline.returncode == 3 and "could not connect to the Hugging Face Hub" in offline.stderr
    assert "the folder to upload is ready at" in offline.stderr
    refused = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert refused.returncode == 3 and "Connection refused" in refused.stderr
    assert (quickstart_run / "upload" / "adapter" / "README.md").is_file()
    empty = tmp_path / "empty"
    empty.write_text("")
    no_token = subprocess.run([*cmd[:-1], str(empty)], capture_output=True, text=True)
    assert no_token.returncode == 2 and "is empty" in no_token.stderr


def test_a_push_that_runs_out_of_space_names_the_upload_folder_in_one_line_and_leaves_nothing(
    quickstart_run, tmp_path
):
    """A full disk while the upload folder is built, as a file size limit (no root needed) that the
    adapter's files exceed: the copy's error named the run's own adapter file, as if that were the
    one to make room for."""
    run = tmp_path / "quickstart"
    shutil.copytree(quickstart_run / "adapter", run / "adapter")
    shutil.copy2(quickstart_run / "run.json", run / "run.json")
    token = tmp_path / "token"
    token.write_text("hf_not_a_real_token\n")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    push = ["push", "--set", f"output.dir={tmp_path}", "--what", "adapter", "--repo-id", "someone/x"]
    result = subprocess.run(
        [sys.executable, "-m", "training", *push, "--token-file", str(token)],
        preexec_fn=small_files,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {run / 'upload' / 'adapter'}: File too large. Free space there" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "run.json"]  # no upload/ it made, empty


def test_a_push_that_fails_leaves_the_upload_folder_that_was_there(quickstart_run, tmp_path, monkeypatch):
    run = tmp_path / "quickstart"
    shutil.copytree(quickstart_run / "adapter", run / "adapter")
    shutil.copy2(quickstart_run / "run.json", run / "run.json")
    (run / "upload").mkdir()  # there before this push: not its to remove

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("training.release.hub.build_card", no_space)
    with pytest.raises(OSError, match="No space left"):
        build_upload_folder(run, "adapter", "someone/x")
    assert (run / "upload").is_dir() and not list((run / "upload").iterdir())


def test_a_push_removes_the_copy_a_killed_push_left(quickstart_run, tmp_path):
    run = tmp_path / "quickstart"
    shutil.copytree(quickstart_run / "adapter", run / "adapter")
    shutil.copy2(quickstart_run / "run.json", run / "run.json")
    killed = run / "upload" / ".adapter.partial-k1ll3d"  # what a push killed while it copied leaves
    shutil.copytree(quickstart_run / "adapter", killed)
    (killed / "adapter_model.safetensors").write_bytes(b"half")
    assert build_upload_folder(run, "adapter", "someone/x") == run / "upload" / "adapter"
    assert sorted(p.name for p in (run / "upload").iterdir()) == ["adapter"]


SAMPLE_RUN = {
    "recipe": {
        "model": {"name": "meta-llama/Llama-2-7b-hf", "revision": None},
        "quantization": {"method": "nf4", "double_quant": True},
        "lora": {"r": 64, "alpha": 16, "dropout": 0.1},
        "data": {
            "source": "heegyu/open-korean-instructions",
            "split": "train[:10%]",
            "format": "text",
            "template": "koalpaca",
        },
    },
    "model": {"lora_target_modules": ["q_proj", "v_proj"]},
    "data": {
        "train": {"rows": 10, "rows_skipped_bad": 0, "rows_over_max_length": 1},
        "eval": None,
        "max_length": 2048,
        "completion_only_loss": False,
    },
    "metrics": {
        "global_step": 100,
        "epoch": 3.0,
        "train_loss_first": 2.0,
        "train_loss_last": 1.0,
        "eval_loss": None,
    },
    "device": {"name": "NVIDIA H100"},
    "versions": {"transformers": "5.23.0", "peft": "0.21.2", "trl": "1.16.0", "bitsandbytes": "0.50.2"},
}
