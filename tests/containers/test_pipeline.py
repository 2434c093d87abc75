"""train -> merge -> serve-cpu with the project's compose.yaml (+ compose.cpu.yaml) in real
containers, everything flowing through the named volumes as in production."""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.error
import urllib.request

import yaml

from tests.containers import stack as st
from tests.containers.stack import HF_SENTINEL, WANDB_SENTINEL, wait_for

pytestmark = st.pytestmark

SHOW_OUTPUTS = """
import json, sys
from pathlib import Path
run = Path("outputs") / sys.argv[1]
print(json.dumps({d: sorted(p.name for p in (run / d).iterdir()) for d in sys.argv[2:] if (run / d).is_dir()}))
"""


def listing(stack, service: str, run: str, *folders: str) -> dict:
    out = stack.run(service, "python", "-c", SHOW_OUTPUTS, run, *folders).ok().output
    return json.loads(out.strip().splitlines()[-1])


def http(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


# --- train ------------------------------------------------------------------------------------


def test_train_runs_the_quickstart_recipe_into_the_outputs_volume(stack, trained):
    assert "Run 'quickstart' complete" in trained.output
    # The merge service sees what train wrote: the volume is shared, not the container.
    files = listing(stack, "merge", "quickstart", "adapter")["adapter"]
    assert {"adapter_config.json", "adapter_model.safetensors", "run.json", "tokenizer.json"} <= set(files)
    # The tiny model was built into the volume too, where merge finds its base weights.
    assert listing(stack, "merge", ".", "tiny-models")["tiny-models"]


def test_train_is_not_root_and_cannot_write_data_or_recipes(stack):
    out = stack.run(
        "train",
        "sh",
        "-c",
        "id -u; for d in data recipes; do touch /workspace/$d/x 2>/dev/null && echo $d-writable || echo $d-read-only; done",
    ).ok()
    uid, data, recipes = out.output.strip().splitlines()[-3:]
    assert uid != "0" and (data, recipes) == ("data-read-only", "recipes-read-only")


def test_secrets_reach_the_containers_as_files_and_nowhere_else(stack, trained):
    code = (
        "import os, huggingface_hub; print(huggingface_hub.get_token()); print(os.environ.get('WANDB_API_KEY')); "
        "print(os.environ.get('HF_TOKEN')); print(sorted(os.listdir('/run/secrets')))"
    )
    lines = stack.run("train", "python", "-c", code).ok().output.strip().splitlines()[-4:]
    # huggingface_hub reads HF_TOKEN_PATH; the entry point hands the W&B key to W&B.
    assert lines == [HF_SENTINEL, WANDB_SENTINEL, "None", "['hf_token', 'wandb_api_key']"]
    # `docker inspect` of the training container shows neither secret.
    inspected = json.dumps(stack.api.inspect(f"{stack.project}-train-main"))
    assert HF_SENTINEL not in inspected and WANDB_SENTINEL not in inspected
    assert "HF_TOKEN_PATH=/run/secrets/hf_token" in inspected


def test_train_reruns_as_a_no_op_once_complete(stack, trained):
    again = stack.run("train").ok()
    assert "already complete" in again.output


# --- graceful stop ----------------------------------------------------------------------------


def write_override(stack, name: str, services: dict) -> str:
    path = stack.directory / name
    path.write_text(yaml.safe_dump({"services": services}))
    return name


def test_compose_stop_lets_training_save_a_checkpoint_and_a_rerun_resumes(stack, trained):
    # A long run, started the way `docker compose up train` starts it; then `docker compose stop`.
    long_run = [
        "python", "-m", "training", "train", "--recipe", "recipes/quickstart.yaml",
        "--set", "output.run_name=stop-test", "--set", "training.max_steps=100000",
    ]  # fmt: skip
    override = write_override(stack, "compose.stop-test.yaml", {"train": {"command": long_run}})
    files = (*stack.files, override)
    test = st.Stack(
        project=stack.project, directory=stack.directory, files=files, env=stack.env, api=stack.api
    )
    test.compose("up", "-d", "--no-deps", "train").ok()
    container = test.container("train")
    try:
        assert test.api.inspect(container)["Config"]["StopTimeout"] == 300  # compose.yaml: 5m
        wait_for(lambda: re.search(r"\b([1-9]\d*)/100000\b", test.logs("train")), 300, "training steps")
        started = time.monotonic()
        test.compose("stop", "train").ok()
        stopped_after = time.monotonic() - started
        state = test.api.inspect(container)["State"]
        logs = test.logs("train")
    finally:
        test.compose("rm", "-f", "-s", "train")
    assert state["ExitCode"] == 143, f"exit {state['ExitCode']} after {stopped_after:.0f} s:\n{logs[-3000:]}"
    assert "SIGTERM received: saving a checkpoint" in logs
    step = int(re.search(r"Stopped at step (\d+)", logs).group(1))
    checkpoints = listing(stack, "merge", "stop-test", "checkpoints")["checkpoints"]
    assert f"checkpoint-{step}" in checkpoints

    resumed = stack.run(*["train", *long_run[:-1], f"training.max_steps={step + 2}"]).ok()
    assert f"Resuming from outputs/stop-test/checkpoints/checkpoint-{step}" in resumed.output
    assert "Run 'stop-test' complete" in resumed.output


def test_the_grace_period_outlasts_a_save_slower_than_composes_default(stack):
    # A stand-in for a large model's checkpoint save: 15 s after SIGTERM, longer than compose's
    # default 10 s. With train's stop_grace_period it ends with its own exit status (143); with
    # the default it would be SIGKILLed (137).
    slow_save = ["bash", "-c", "trap 'sleep 15; exit 143' TERM; echo ready; while :; do sleep 0.2; done"]
    override = write_override(stack, "compose.slow-save.yaml", {"train": {"command": slow_save}})
    test = st.Stack(stack.project, stack.directory, (*stack.files, override), stack.env, stack.api)
    test.compose("up", "-d", "--no-deps", "train").ok()
    container = test.container("train")
    try:
        wait_for(lambda: "ready" in test.logs("train"), 60, "the container to start")
        started = time.monotonic()
        test.compose("stop", "train").ok()
        took = time.monotonic() - started
        exit_code = test.api.inspect(container)["State"]["ExitCode"]
    finally:
        test.compose("rm", "-f", "-s", "train")
    assert exit_code == 143 and took >= 14, f"exit {exit_code} after {took:.0f} s"


# --- merge ------------------------------------------------------------------------------------


def test_merge_reads_the_adapter_and_writes_the_merged_model_to_the_volume(stack, merged):
    files = set(listing(stack, "train", "quickstart", "merged")["merged"])
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    assert "adapter_config.json" not in files and not any(f.endswith(".bin") for f in files)


# --- serve-cpu --------------------------------------------------------------------------------


def test_serve_cpu_answers_on_the_host_under_the_run_name(stack, server):
    models = http(f"{server}/v1/models")
    assert "quickstart" in [m["id"] for m in models["data"]]
    reply = http(
        f"{server}/v1/chat/completions",
        {"model": "quickstart", "messages": [{"role": "user", "content": "日本の首都は？"}], "max_tokens": 8},
    )
    assert reply["choices"][0]["message"]["content"] is not None
    # Published on 127.0.0.1 only.
    bindings = stack.api.inspect(stack.container("serve-cpu"))["HostConfig"]["PortBindings"]
    assert {b["HostIp"] for spec in bindings.values() for b in spec} == {"127.0.0.1"}


def test_serve_cpu_answers_another_container_by_service_name(stack, server):
    out = stack.run(
        "notebook",
        "python",
        "-m",
        "serving",
        "chat",
        "--url",
        "http://serve-cpu:8080",
        "--max-new-tokens",
        "8",
        "--no-stream",
        "日本の首都は？",
    ).ok()
    assert out.output.strip()
    models = stack.run("train", "curl", "-fsS", "http://serve-cpu:8080/v1/models").ok().output
    assert '"quickstart"' in models


def test_serve_cpu_reads_outputs_read_only(stack, server):
    done = stack.compose("exec", "-T", "serve-cpu", "touch", "/outputs/x")
    assert done.returncode != 0 and "Read-only file system" in done.output


# --- serve-cpu hardening (issue 7, item 8): checked inside the running container ---------------

PROBE = """
grep -E '^(CapPrm|CapEff|CapBnd|NoNewPrivs):' /proc/1/status
for path in / /workspace /home/app /outputs/quickstart/merged /tmp; do
  if touch "$path/.probe" 2>/dev/null; then echo "writable $path"; rm -f "$path/.probe"; else echo "read-only $path"; fi
done
"""


def test_serve_cpu_serves_with_no_capabilities_no_privilege_gain_and_a_read_only_root(stack, server):
    # It serves like this: the fixture waited for healthy, and it answers now.
    assert "quickstart" in json.dumps(http(f"{server}/v1/models"))
    out = stack.compose("exec", "-T", "serve-cpu", "sh", "-c", PROBE).ok().output
    status = dict(re.findall(r"^(\w+):\s+(\S+)$", out, flags=re.M))
    # PID 1 (tini, then the server under it) holds no capability, none can be regained
    # (an empty bounding set: cap_drop ALL) and setuid binaries grant nothing (no-new-privileges).
    assert status == {"CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": "0" * 16, "NoNewPrivs": "1"}, out
    writable = set(re.findall(r"^writable (\S+)$", out, flags=re.M))
    read_only = set(re.findall(r"^read-only (\S+)$", out, flags=re.M))
    # The root filesystem and the model are read-only; /tmp (a tmpfs) is the scratch space.
    assert writable == {"/tmp"} and read_only == {
        "/",
        "/workspace",
        "/home/app",
        "/outputs/quickstart/merged",
    }
    host_config = stack.api.inspect(stack.container("serve-cpu"))["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True


def status_of(url: str, headers: dict[str, str], body: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_serve_cpu_with_an_api_key_refuses_generation_without_a_bearer_token(stack, server):
    key = secrets.token_hex(16)
    up = ("up", "-d", "--wait", "--wait-timeout", "600", "--force-recreate", "serve-cpu")
    chat = {
        "model": "quickstart",
        "messages": [{"role": "user", "content": "日本の首都は？"}],
        "max_tokens": 2,
    }
    completion = {"model": "quickstart", "prompt": "日本の首都は", "max_tokens": 2}
    try:
        stack.compose(*up, env={"API_KEY": key}).ok()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            assert status_of(f"{server}/v1/chat/completions", headers, chat) == 401, headers
            assert status_of(f"{server}/v1/completions", headers, completion) == 401, headers
            assert status_of(f"{server}/v1/models", headers) == 401, headers
        bearer = {"Authorization": f"Bearer {key}"}
        assert status_of(f"{server}/v1/chat/completions", bearer, chat) == 200
        assert status_of(f"{server}/health", {}) == 200  # the healthcheck needs no key
    finally:
        # Back to the server as it ships (no key), for any test that comes after this one.
        stack.compose(*up).ok()


def test_compose_stop_ends_serve_cpu_cleanly(stack, server):
    container = stack.container("serve-cpu")
    # compose.yaml's stop_grace_period: without it Podman's Docker API stops with 0 s, a SIGKILL.
    assert stack.api.inspect(container)["Config"]["StopTimeout"] == 30
    try:
        stack.compose("stop", "serve-cpu").ok()
        state = stack.api.inspect(container)["State"]
        # SIGTERM: uvicorn shuts down gracefully and the server exits 0 (137 would be a SIGKILL,
        # 143 a death by the signal itself).
        assert state["ExitCode"] == 0, f"exit {state['ExitCode']}:\n{stack.logs('serve-cpu')[-3000:]}"
    finally:
        stack.compose("up", "-d", "--wait", "--wait-timeout", "600", "serve-cpu").ok()
