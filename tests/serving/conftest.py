"""Serving fixtures: the quickstart run merged, and one real local server on 127.0.0.1 for the session."""

from __future__ import annotations

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
