"""export -> serve-llamacpp: the export service writes the merged model's GGUF into the outputs volume,
and llama.cpp's server serves it from its own small image, locked down as the other servers are
(compose.yaml), with the limits and fixes of `make serve SERVE_BACKEND=llamacpp` without Docker."""

from __future__ import annotations

import re
import secrets
import shlex
import subprocess

import pytest

from serving.client import ServingClient
from tests.containers import stack as st
from tests.containers.test_pipeline import http, listing, status_of
from tests.serving.backends.test_llamacpp import check_answers_to_the_end_of_the_context

pytestmark = st.pytestmark

SERVICE = "serve-llamacpp"
CHAT = {"model": "quickstart", "messages": [{"role": "user", "content": "日本の首都は？"}], "max_tokens": 8}
LOCKED_DOWN = """
grep -E '^(CapPrm|CapEff|CapBnd|NoNewPrivs):' /proc/1/status
for path in / /opt/qlora-stack /outputs/quickstart/gguf /tmp; do
  if touch "$path/.probe" 2>/dev/null; then echo "writable $path"; rm -f "$path/.probe"; else echo "read-only $path"; fi
done
id -u
"""


@pytest.fixture(scope="module")
def exported(stack, merged) -> st.Result:
    """`export` as it ships: the quickstart's merged model as a verified q4_k_m GGUF."""
    return stack.run("export").ok()


def up(stack, port: str, **env: str) -> st.Result:
    return stack.up(SERVICE, port, wait_timeout=300, **env)


@pytest.fixture(scope="module")
def llamacpp(stack, exported, port) -> str:
    """serve-llamacpp (profile cpu) on the export; its URL on the host."""
    up(stack, port)
    return f"http://127.0.0.1:{port}"


def test_the_project_image_loads_llama_cpp_on_its_own(stack):
    # Its OpenMP library comes from the image, not from a torch imported before it.
    assert stack.run("export", "python", "-c", "import llama_cpp; print(llama_cpp.__version__)").ok()


def test_export_writes_the_verified_gguf_and_its_modelfile_into_the_outputs_volume(stack, exported):
    assert listing(stack, "train", "quickstart", "gguf") == {
        "gguf": ["quickstart-q4_k_m.Modelfile", "quickstart-q4_k_m.export.json", "quickstart-q4_k_m.gguf"]
    }
    assert "verified: mean KL" in exported.output and "ollama create quickstart-q4_k_m" in exported.output


def test_it_serves_the_export_under_the_run_name_with_the_recipes_limit(stack, llamacpp):
    assert [m["id"] for m in http(f"{llamacpp}/v1/models")["data"]] == ["quickstart"]
    assert http(f"{llamacpp}/v1/chat/completions", CHAT)["choices"][0]["message"]["content"] is not None
    bindings = stack.api.inspect(stack.container(SERVICE))["HostConfig"]["PortBindings"]
    assert {b["HostIp"] for spec in bindings.values() for b in spec} == {"127.0.0.1"}
    # The banner of serving/llamacpp_server.py: the recipe's max_length, not a fixed 2048, and the URL on
    # the host (the container's own is 0.0.0.0:8080).
    logs = stack.logs(SERVICE)
    assert re.search(r"limit\s+256 tokens per request, prompt \+ answer, from the recipe", logs)
    assert f"URL     {llamacpp}  (" in logs and f"(SERVE_URL={llamacpp})" in logs


def test_answers_that_run_to_the_end_of_the_context_finish_and_the_next_request_is_answered(stack, llamacpp):
    """What llama-cpp-python's own server, which the service ran before, got wrong."""
    check_answers_to_the_end_of_the_context(ServingClient(llamacpp))
    assert "llama_decode returned" not in stack.logs(SERVICE)


def test_it_runs_as_nobody_without_capabilities_on_a_read_only_root_and_model(stack, llamacpp):
    out = stack.compose("exec", "-T", SERVICE, "sh", "-c", LOCKED_DOWN).ok().output
    status = dict(re.findall(r"^(\w+):\s+(\S+)$", out, flags=re.M))
    assert status == {"CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": "0" * 16, "NoNewPrivs": "1"}, out
    assert set(re.findall(r"^writable (\S+)$", out, flags=re.M)) == {"/tmp"}
    assert set(re.findall(r"^read-only (\S+)$", out, flags=re.M)) == {
        "/",
        "/opt/qlora-stack",
        "/outputs/quickstart/gguf",
    }
    assert out.strip().splitlines()[-1] == "65534"


def test_with_an_api_key_it_refuses_requests_without_the_bearer_token(stack, llamacpp, port):
    key = secrets.token_hex(16)
    try:
        up(stack, port, API_KEY=key)  # healthy: the healthcheck sends the key
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert status_of(f"{llamacpp}/v1/chat/completions", headers, CHAT) == 401, headers
            assert status_of(f"{llamacpp}/v1/models", headers) == 401, headers
        assert status_of(f"{llamacpp}/v1/chat/completions", {"Authorization": f"Bearer {key}"}, CHAT) == 200
    finally:
        up(stack, port)


def test_compose_stop_ends_it_cleanly(stack, llamacpp, port):
    assert stack.api.inspect(stack.container(SERVICE))["Config"]["StopTimeout"] == 30
    stopped = stack.stop(SERVICE, port)
    # SIGTERM reaches the server through tini; uvicorn finishes and exits 0 (a SIGKILL would be 137).
    assert stopped.exit_code == 0 and stopped.seconds < 10, stopped


def test_make_serve_stops_at_a_refused_setting_where_compose_run_loses_the_exit_status(stack, exported, port):
    """make serve computes its settings in a `compose run --rm` container, whose exit status Podman's
    compose loses (it exits 0): the empty output must stop it there too. A blank API_KEY is refused by
    the settings step, and the server would otherwise start locked with a key nobody can send."""
    make = [
        "make", "serve", "RUNTIME=docker", "SERVE_BACKEND=llamacpp", f"COMPOSE={shlex.join(stack.command)}",
        f"SERVE_PORT={port}",
    ]  # fmt: skip
    stack.compose("rm", "--stop", "--force", SERVICE).ok()
    done = subprocess.run(
        make,
        cwd=stack.directory,
        env={**stack.env, "API_KEY": " "},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert "API_KEY set but empty" in done.stderr
    running = stack.compose("ps", "--status", "running", "--services").ok().output.split()
    assert SERVICE not in running
