"""Serving fixtures: the quickstart run merged, and one real local server on 127.0.0.1 for the session."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The session's server requires this key, so every test also runs through the auth check.
API_KEY = "test-key"


def merge_for_tests(run_dir: Path) -> Path:
    """outputs/<run>/merged the way the merge step writes it, until training.merge lands.

    A standard model directory: safetensors weights, the adapter's tokenizer with its
    chat_template in tokenizer_config.json (TGI reads it there) and chat_template.jinja,
    generation_config.json, and merge.json with the run's recipe.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    adapter = run_dir / "adapter"
    record = json.loads((adapter / "run.json").read_text(encoding="utf-8"))
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    merged = run_dir / "merged"
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    model.save_pretrained(merged, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    tokenizer.save_pretrained(merged)
    config_path = merged / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2), encoding="utf-8")
    GenerationConfig.from_pretrained(base_path).save_pretrained(merged)
    merge_record = {"run_name": record["run_name"], "recipe": record["recipe"], "adapter": str(adapter)}
    (merged / "merge.json").write_text(json.dumps(merge_record, indent=2), encoding="utf-8")
    return merged


@pytest.fixture(scope="session")
def merged_model(quickstart_run) -> Path:
    """The quickstart run (tiny Llama, dolly-ja template), merged: outputs/quickstart/merged."""
    return merge_for_tests(quickstart_run)


class ServerProcess:
    """`python -m serving serve` in a subprocess on a free port of 127.0.0.1."""

    START_TIMEOUT = 300  # seconds; loading the tiny model takes a few

    def __init__(self, model_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "serving", "serve", "--model-dir", str(model_dir), "--port", "0", *extra]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + self.START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self.proc.wait()
                raise RuntimeError("the server exited before listening:\n" + "".join(self.output))
            found = re.search(r"URL\s+(http://127\.0\.0\.1:\d+)", line)
            if found:
                return found.group(1)
        self.stop()
        raise RuntimeError(
            f"the server did not listen within {self.START_TIMEOUT} s:\n" + "".join(self.output)
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def local_server(merged_model) -> Iterator[ServerProcess]:
    server = ServerProcess(merged_model, env={"API_KEY": API_KEY})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def merged_reference(merged_model):
    """The merged model loaded in this process: what greedy generation should produce."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged_model)
    model.eval()
    return model, AutoTokenizer.from_pretrained(merged_model)
