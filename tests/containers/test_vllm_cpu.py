"""vllm-cpu: vLLM's engine on the CPU in a real container, on the model that train and merge left in
the outputs volume, locked down as the other servers are (compose.yaml), and stopped cleanly."""

from __future__ import annotations

import json
import re
import secrets

import pytest

from tests.containers import stack as st
from tests.containers.test_pipeline import PROBE, http, status_of

pytestmark = st.pytestmark

SERVICE = "vllm-cpu"
CHAT = {"model": "quickstart", "messages": [{"role": "user", "content": "日本の首都は？"}], "max_tokens": 8}
COMPLETION = {
    "model": "quickstart",
    "prompt": "ユーザー:日本の首都は？\nシステム:",
    "max_tokens": 8,
    "temperature": 0,
}


def up(stack, port: str, **env: str) -> st.Result:
    return stack.up(SERVICE, port, wait_timeout=900, **env)


@pytest.fixture(scope="module")
def vllm_cpu(stack, merged, port) -> str:
    """The vllm-cpu service on the merged quickstart model; its URL on the host."""
    up(stack, port)
    return f"http://127.0.0.1:{port}"


def test_it_serves_the_run_on_vllm_from_the_host(stack, vllm_cpu):
    models = http(f"{vllm_cpu}/v1/models")
    assert [(m["id"], m["owned_by"], m["max_model_len"]) for m in models["data"]] == [
        ("quickstart", "vllm", 256)
    ]
    assert http(f"{vllm_cpu}/v1/chat/completions", CHAT)["choices"][0]["message"]["content"] is not None
    completion = http(f"{vllm_cpu}/v1/completions", COMPLETION)
    assert completion["model"] == "quickstart" and completion["usage"]["completion_tokens"] >= 1
    bindings = stack.api.inspect(stack.container(SERVICE))["HostConfig"]["PortBindings"]
    assert {b["HostIp"] for spec in bindings.values() for b in spec} == {"127.0.0.1"}
    logs = stack.logs(SERVICE)
    assert (
        "--dtype float32" in logs and "--max-model-len 256" in logs
    )  # the model's dtype, the recipe's limit
    # The image installs the project's vLLM plugin (pyproject.toml): the warm-up of serving/mkl_vml.py.
    assert "oneMKL vector math settled" in logs


def test_it_answers_another_container_by_service_name(stack, vllm_cpu, port):
    url = "http://vllm-cpu:8000"
    out = stack.run(
        "notebook",
        "python",
        "-m",
        "serving",
        "chat",
        "--url",
        url,
        "--max-new-tokens",
        "8",
        "--no-stream",
        "日本の首都は？",
    ).ok()
    assert out.output.strip()
    body = json.dumps(COMPLETION, ensure_ascii=False)
    answer = stack.run(
        "train", "curl", "-fsS", "-H", "Content-Type: application/json", "-d", body, f"{url}/v1/completions"
    )
    assert '"text"' in answer.ok().output


def test_it_runs_without_capabilities_on_a_read_only_root_and_model(stack, vllm_cpu):
    out = stack.compose("exec", "-T", SERVICE, "sh", "-c", PROBE).ok().output
    status = dict(re.findall(r"^(\w+):\s+(\S+)$", out, flags=re.M))
    assert status == {"CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": "0" * 16, "NoNewPrivs": "1"}, out
    writable = set(re.findall(r"^writable (\S+)$", out, flags=re.M))
    read_only = set(re.findall(r"^read-only (\S+)$", out, flags=re.M))
    assert writable == {"/tmp"} and read_only == {
        "/",
        "/workspace",
        "/home/app",
        "/outputs/quickstart/merged",
    }
    assert stack.api.inspect(stack.container(SERVICE))["HostConfig"]["ReadonlyRootfs"] is True
    user = stack.compose("exec", "-T", SERVICE, "id", "-u").ok().output.strip().splitlines()[-1]
    assert user != "0"


def test_with_an_api_key_it_refuses_requests_without_the_bearer_token(stack, vllm_cpu, port):
    key = secrets.token_hex(16)
    try:
        up(stack, port, API_KEY=key)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            assert status_of(f"{vllm_cpu}/v1/chat/completions", headers, CHAT) == 401, headers
            assert status_of(f"{vllm_cpu}/v1/completions", headers, COMPLETION) == 401, headers
            assert status_of(f"{vllm_cpu}/v1/models", headers) == 401, headers
        bearer = {"Authorization": f"Bearer {key}"}
        assert status_of(f"{vllm_cpu}/v1/chat/completions", bearer, CHAT) == 200
        assert status_of(f"{vllm_cpu}/health", {}) == 200  # the healthcheck needs no key
    finally:
        up(stack, port)


def test_compose_stop_ends_it_cleanly(stack, vllm_cpu, port):
    # compose.yaml's stop_grace_period: without it Podman's Docker API stops with 0 s, a SIGKILL.
    assert stack.api.inspect(stack.container(SERVICE))["Config"]["StopTimeout"] == 30
    stopped = stack.stop(SERVICE, port)
    # SIGTERM reaches vLLM through tini and the launcher; it shuts its engine down and exits 0,
    # well within the grace period (a SIGKILL would be 137).
    assert stopped.exit_code == 0 and stopped.seconds < 10, stopped
    assert "Application shutdown complete" in stopped.logs, stopped
