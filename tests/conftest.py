"""Shared fixtures: tiny real models built once per session, and trained runs reused by tests."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)  # recipes name data/ and recipes/ relative to the project root, as users run them
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub, whatever .env says

# After the settings above: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported.
from serving import mkl_vml  # noqa: E402
from training.cli import main as cli_main  # noqa: E402
from training.merge.coordinator import MergeSettings, merge_adapter  # noqa: E402
from training.model.tiny import ARCHITECTURES, ensure_tiny_model  # noqa: E402
from training.recipe import load_recipe  # noqa: E402
from training.train.run import run_training  # noqa: E402

# As the stack's entry points do, before any test computes: tests compare forward passes within
# this one process, and a first concurrent call of a oneMKL vector-math function (the rotary cos)
# can be inaccurate (pytorch/pytorch#188792, serving/mkl_vml.py).
mkl_vml.warm_up()

# Short runs of the tiny models: a few seconds each on two CPU cores.
FAST = ["training.num_train_epochs=1", "training.logging_steps=2"]


# Written by Python and pytest themselves, or by the developer's setup (make venv, make lint).
_NOT_THE_TESTS = {".git", ".pytest_cache", ".ruff_cache", "__pycache__", ".venv", ".venv-tools"}


def _checkout_entries() -> set[str]:
    """Every file and folder two levels deep in the checkout."""
    entries = set()
    for top in os.scandir(ROOT):
        if top.name in _NOT_THE_TESTS or top.name.endswith(".egg-info"):
            continue
        entries.add(top.name)
        if top.is_dir(follow_symlinks=False):
            entries |= {f"{top.name}/{e.name}" for e in os.scandir(top.path) if e.name not in _NOT_THE_TESTS}
    return entries


@pytest.fixture(autouse=True)
def _tests_leave_the_checkout_alone():
    """A test writes under tmp_path, never into the checkout (a .env written here by a test would
    become the developer's settings for every later make). Files created or deleted count; edits
    do not, so that a developer may edit while the tests run."""
    before = _checkout_entries()
    yield
    changed = sorted(before ^ _checkout_entries())
    assert not changed, f"the test created or deleted in the checkout {ROOT}: {changed}; use tmp_path"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:

    folder = tmp_path_factory.mktemp("tiny-models")
    os.environ["QLORA_TINY_DIR"] = str(folder)
    for arch in ARCHITECTURES:
        ensure_tiny_model(arch, out_dir=folder, data_dir=ROOT / "data")
    return folder


@pytest.fixture(scope="session")
def llama_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "llama")


@pytest.fixture(scope="session")
def neox_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "gpt-neox")


def train_in_process(
    recipe: str,
    out_dir: Path,
    *overrides: str,
    force: bool = False,
    measure_memory: bool = False,
    profile_steps: int = 0,
) -> int:

    loaded = load_recipe(recipe, [f"output.dir={out_dir}", *overrides])
    return run_training(
        loaded, recipe, force=force, measure_memory=measure_memory, profile_steps=profile_steps
    )


def train_command(recipe: str, out_dir: Path, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "training", "train", "--recipe", recipe, "--set", f"output.dir={out_dir}"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args], capture_output=True, text=True, check=check
    )


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m training ARGS` run by this process: what run_cli answers, without the 6-12 s a new
    process takes to import torch, transformers and TRL again (2 cores). Its log lines go to the
    captured stderr, as the CLI's own handler prints them. For commands that take locks, run_cli:
    a lock this process holds does not stop it."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli_main(list(args))
            except SystemExit as e:  # argparse's usage errors
                status = e.code
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(
        ["python", "-m", "training", *args], status, out.getvalue(), err.getvalue()
    )


def read_run(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tools_run(tiny_dir, tmp_path_factory) -> Path:
    """The tool-call quickstart (tiny Qwen2, its own template, data/tool_calls.jsonl), trained and
    merged (verified) once for the session: <run>/merged."""
    out = tmp_path_factory.mktemp("runs")
    assert train_in_process("recipes/quickstart-tools.yaml", out) == 0
    run = out / "quickstart-tools"
    merge_adapter(run / "adapter", run / "merged", MergeSettings(), force=True)
    return run


@pytest.fixture(scope="session")
def llama3_tools_run(tiny_dir, tmp_path_factory) -> Path:
    """The tool-call quickstart on Llama 3.1's form (tiny Llama 3, its own template: calls as bare
    JSON, responses found by rendering), trained and merged once for the session: <run>/merged."""
    out = tmp_path_factory.mktemp("runs")
    assert train_in_process("recipes/quickstart-tools-llama3.yaml", out) == 0
    run = out / "quickstart-tools-llama3"
    merge_adapter(run / "adapter", run / "merged", MergeSettings(), force=True)
    return run


@pytest.fixture(scope="session")
def quickstart_run(tiny_dir, tmp_path_factory) -> Path:
    """The quickstart recipe (tiny Llama, dolly-ja, 4-bit QLoRA), trained once for the session."""
    out = tmp_path_factory.mktemp("runs")
    # Measuring memory as `train --measure-memory` does, so the run records its tensor peak too.
    assert train_in_process("recipes/quickstart.yaml", out, measure_memory=True) == 0
    return out / "quickstart"


@pytest.fixture(scope="session")
def neox_run(tiny_dir, tmp_path_factory) -> Path:
    """The tiny GPT-NeoX recipe (Korean <usr>/<bot> text, packing), trained once for the session."""
    out = tmp_path_factory.mktemp("runs")
    assert train_in_process("recipes/quickstart-gpt-neox-ko.yaml", out) == 0
    return out / "quickstart-gpt-neox-ko"


def export_cli(merged: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m training export --merged MERGED ...`, as users run it."""
    return run_cli("export", "--merged", str(merged), *args)


def exported_run(source_run: Path, out: Path, quants: str) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of a trained run, merged (merge.json with its recipe) and exported to GGUF by the CLI."""
    run = out / source_run.name
    shutil.copytree(source_run / "adapter", run / "adapter")
    merge_adapter(run / "adapter", run / "merged", MergeSettings(verify=False))
    return run, export_cli(run / "merged", "--quant", quants)


@pytest.fixture(scope="session")
def quickstart_gguf(quickstart_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The quickstart run (tiny Llama, dolly-ja) merged and exported as f32, q8_0 and q4_k_m, once."""
    return exported_run(quickstart_run, tmp_path_factory.mktemp("gguf"), "f32,q8_0,q4_k_m")


@pytest.fixture(scope="session")
def tools_gguf(tools_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tool-call quickstart (tiny Qwen2, Qwen2.5's template) merged and exported as f32, once."""
    return exported_run(tools_run, tmp_path_factory.mktemp("gguf"), "f32")


@pytest.fixture(scope="session")
def llama3_tools_gguf(llama3_tools_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tool-call quickstart on Llama 3.1's form (tiny Llama 3, its own template) merged and
    exported as f32, once."""
    return exported_run(llama3_tools_run, tmp_path_factory.mktemp("gguf"), "f32")
