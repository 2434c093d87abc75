"""Before a run writes anything: model and data reachable or cached, and a CPU able to train the recipe."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from tests.conftest import ROOT, cli_in_process
from training.errors import RecipeError
from training.recipe import load_recipe
from training.train.preflight import cpu_problems, data_problems, model_problems, preflight

QUICK = "recipes/quickstart.yaml"

LLAMA_7B_CONFIG = ROOT / "bench" / "configs" / "llama-2-7b.json"


def config_only_model(tmp_path: Path) -> Path:
    """A Llama-2-7B as far as its size goes: its real config.json (no weights are read before training)."""
    folder = tmp_path / "llama-2-7b"
    folder.mkdir()
    shutil.copy(LLAMA_7B_CONFIG, folder / "config.json")
    return folder


def fake_hub_cache(tmp_path: Path, repo: str) -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/) holding a 7B config and weights."""
    cache = tmp_path / "hub"
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    shutil.copy(LLAMA_7B_CONFIG, snapshot / "config.json")
    (snapshot / "model.safetensors").write_bytes(b"")  # present is what the lookup asks
    return cache


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sources(recipe) -> list[str]:
    return model_problems(recipe) + data_problems(recipe)


@pytest.fixture
def hub_online_but_unreachable(monkeypatch):
    """HF_HUB_OFFLINE unset and the Hub at an address where nothing listens (connection refused)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")


def test_the_quickstart_passes(tiny_dir):
    recipe = load_recipe("recipes/quickstart.yaml")
    assert sources(recipe) == [] and cpu_problems(recipe) == []
    preflight(recipe, "recipes/quickstart.yaml", cuda=False)


def test_a_missing_data_file_or_tiny_model_is_refused_before_anything_is_written(tiny_dir, tmp_path):
    out = tmp_path / "outputs"
    done = cli_in_process(
        "train", "--recipe", QUICK, "--set", "data.source=data/nope.jsonl", "--set", f"output.dir={out}"
    )
    assert done.returncode == 2
    assert "data.source data/nope.jsonl: data file not found" in done.stderr
    assert "judged from the model's config.json" not in done.stderr  # the tiny model is here to judge
    assert not out.exists()  # no recipe.json, no run folder
    # validate finds the same without the Hub, and a misspelled tiny model too.
    done = cli_in_process("validate", "--recipe", QUICK, "--set", "data.source=data/nope.jsonl")
    assert done.returncode == 2 and "data.source data/nope.jsonl: data file not found" in done.stderr
    done = cli_in_process("validate", "--recipe", QUICK, "--set", "model.name=tiny://lama")
    assert done.returncode == 2
    assert "model.name tiny://lama: no such tiny model; available: tiny://llama, " in done.stderr


def test_a_7b_recipe_needs_a_gpu_unless_the_user_insists(tmp_path, caplog):
    recipe = load_recipe(
        "recipes/llama2-7b-ko-instructions.yaml",
        [f"model.name={config_only_model(tmp_path)}", "data.source=data/ja_dolly.jsonl"],
    )
    with pytest.raises(RecipeError) as refused:
        preflight(recipe, "recipes/llama2-7b-ko-instructions.yaml", cuda=False)
    message = str(refused.value)
    assert "this recipe needs an NVIDIA GPU (CUDA), and this machine has none" in message
    assert "4 x 2 x 2048 tokens through 6.61 billion linear-layer weights" in message
    assert "--allow-cpu (make train ALLOW_CPU=1)" in message
    with caplog.at_level(logging.WARNING):
        preflight(recipe, "r.yaml", cuda=False, allow_cpu=True)
    assert "--allow-cpu: training on the CPU although one optimizer step" in caplog.text
    preflight(recipe, "r.yaml", cuda=True)  # on a GPU nothing here stands in the way


def test_offline_and_not_cached_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    recipe = load_recipe("recipes/open-calm-7b-dolly-ja.yaml")
    problems = sources(recipe)
    assert len(problems) == 2
    assert problems[0].startswith("model.name cyberagent/open-calm-7b: not in the Hugging Face cache")
    assert problems[1].startswith("data.source kunishou/databricks-dolly-15k-ja: not in the Hugging Face")
    assert all("HF_HUB_OFFLINE=1 forbids downloading it" in p for p in problems)


def test_an_unreachable_hub_is_asked_once_and_a_cached_copy_is_pointed_out(
    tmp_path, monkeypatch, hub_online_but_unreachable
):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path, "meta-llama/Llama-2-7b-hf")))
    recipe = load_recipe("recipes/llama2-7b-ko-instructions.yaml")
    model, data = sources(recipe)
    assert "is unreachable (ConnectError" in model and "set HF_HUB_OFFLINE=1 to train from that copy" in model
    assert "is unreachable" in data and "set data.source to a local .jsonl file" in data
    # Offline, the cached copy is used: the model is there, and then its size decides.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    recipe = load_recipe("recipes/llama2-7b-ko-instructions.yaml", ["data.source=data/ja_dolly.jsonl"])
    assert sources(recipe) == []
    assert "6.61 billion linear-layer weights" in cpu_problems(recipe)[0]


@pytest.mark.slow
def test_a_gpu_recipe_without_gpu_or_hub_fails_at_once_and_writes_nothing(tmp_path):
    out = tmp_path / "outputs"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"  # nothing listens: like no network
    done = subprocess.run(
        [sys.executable, "-m", "training", "train", "--recipe", "recipes/open-calm-7b-dolly-ja.yaml"]
        + ["--set", f"output.dir={out}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Retrying" not in done.stderr  # one request per repository, no backoff
    assert "model.name cyberagent/open-calm-7b" in done.stderr and "is unreachable" in done.stderr
    assert torch.cuda.is_available() or "no NVIDIA GPU" in done.stderr
    assert not out.exists()  # no recipe.json, no run folder
