"""The notebook service: JupyterLab's token policy in a real container, and the three notebooks
run top to bottom inside it on the tiny model."""

from __future__ import annotations

import json
import re
import secrets
import urllib.error
import urllib.request

import pytest

from tests.containers import stack as st

pytestmark = st.pytestmark

NOTEBOOKS = ("01_qlora_quickstart", "02_compare_models", "03_query_endpoint")
# Every running process's command line, as the kernel shows it to anyone in the container.
CMDLINES = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        print(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
    except OSError:
        pass
"""


def status(url: str, token: str | None = None, method: str = "GET", body: dict | None = None) -> int:
    headers = {"Authorization": f"token {token}"} if token else {}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def start_notebook(stack, jupyter_token: str) -> st.Result:
    env = {"JUPYTER_TOKEN": jupyter_token}
    return stack.compose(
        "up", "-d", "--wait", "--wait-timeout", "180", "--force-recreate", "notebook", env=env
    )


@pytest.fixture(scope="module")
def jupyter(stack):
    """JupyterLab as it ships: no JUPYTER_TOKEN in .env, so a random one, printed at start."""
    start_notebook(stack, "").ok()
    logs = stack.logs("notebook")
    match = re.search(r"JupyterLab: http://127\.0\.0\.1:(\d+)/lab\?token=(\S+)", logs)
    assert match, f"no URL with a token in the logs:\n{logs[-3000:]}"
    port, token = match.groups()
    assert port == stack.env["NOTEBOOK_PORT"]
    yield f"http://127.0.0.1:{port}", token
    stack.compose("rm", "-f", "-s", "notebook")


def test_jupyterlab_answers_with_its_token_and_refuses_without(jupyter):
    url, token = jupyter
    assert re.fullmatch(r"[0-9a-f]{64}", token)  # 32 random bytes
    assert status(f"{url}/api") == 200  # the healthcheck's endpoint: the version only
    for path in ("/api/kernels", "/api/contents", "/api/sessions", "/api/terminals"):
        assert status(f"{url}{path}") == 403, path
        assert status(f"{url}{path}", token="0" * 64) == 403, path
        assert status(f"{url}{path}", token=token) == 200, path
    assert status(f"{url}/api/kernels?token={token}") == 200


def test_the_token_is_in_no_process_argument_and_not_in_docker_inspect(stack, jupyter):
    _, token = jupyter
    cmdlines = stack.compose("exec", "-T", "notebook", "python", "-c", CMDLINES).ok().output
    assert "jupyter-lab" in cmdlines and token not in cmdlines
    inspected = stack.api.inspect(stack.container("notebook"))
    assert token not in json.dumps(inspected)
    assert not any(e.startswith("JUPYTER_TOKEN=") for e in inspected["Config"]["Env"])


def test_jupyterlab_runs_as_the_non_root_user_healthy_on_127_0_0_1_only(stack, jupyter):
    uid = stack.compose("exec", "-T", "notebook", "id", "-u").ok().output.strip().splitlines()[-1]
    assert uid != "0"
    inspected = stack.api.inspect(stack.container("notebook"))
    assert inspected["State"]["Health"]["Status"] == "healthy"
    bindings = inspected["HostConfig"]["PortBindings"]
    assert {b["HostIp"] for spec in bindings.values() for b in spec} == {"127.0.0.1"}
    assert "--allow-root" not in " ".join(inspected["Config"]["Cmd"])


def test_edits_in_jupyterlab_land_in_the_project_on_the_host(stack, jupyter):
    url, token = jupyter
    name = f"scratch-{secrets.token_hex(3)}.ipynb"
    assert status(f"{url}/api/contents/notebooks/{name}", token, "PUT", {"type": "notebook"}) == 201
    saved = stack.directory / "notebooks" / name
    try:
        assert json.loads(saved.read_text())["nbformat"] == 4
    finally:
        saved.unlink(missing_ok=True)


def test_a_token_from_env_is_used_and_a_weak_one_is_refused(stack, jupyter):
    url, _ = jupyter
    chosen = secrets.token_hex(32)
    start_notebook(stack, chosen).ok()
    logs = stack.logs("notebook")
    assert chosen not in logs and "<JUPYTER_TOKEN from .env>" in logs
    assert status(f"{url}/api/kernels", token=chosen) == 200
    assert status(f"{url}/api/kernels") == 403

    weak = start_notebook(stack, "letmein")
    assert weak.returncode != 0
    assert "at least 32" in stack.logs("notebook")
    assert stack.api.inspect(stack.container("notebook"))["State"]["Running"] is False


def execute_in_container(stack, name: str, env: dict | None = None) -> None:
    out = stack.run(
        "notebook",
        "python",
        "tests/containers/execute_notebook.py",
        f"notebooks/{name}.ipynb",
        "--out",
        "/workspace/outputs/executed-notebooks",
        env=env,
    )
    assert out.returncode == 0, out.tail(120)
    assert f"ok notebooks/{name}.ipynb" in out.output


@pytest.mark.parametrize("name", NOTEBOOKS[:2])
def test_notebook_runs_top_to_bottom_in_the_container(stack, merged, name):
    execute_in_container(stack, name)


def test_query_endpoint_notebook_runs_against_serve_cpu(stack, server):
    execute_in_container(stack, NOTEBOOKS[2], env={"SERVE_URL": "http://serve-cpu:8080"})
