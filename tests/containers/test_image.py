"""The image built from docker/Dockerfile: no secret, data, outputs or git history in any layer,
whatever the build context holds; a non-root user; tini as PID 1."""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.containers import stack as st
from tests.containers.stack import ROOT, EngineAPI, copy_project

pytestmark = st.pytestmark

SENTINEL = f"sentinel-{uuid.uuid4().hex}"
# What a user's checkout holds beside the code, each with the sentinel inside.
PRIVATE = {
    ".env": f"HF_TOKEN={SENTINEL}\n",
    ".env.local": f"WANDB_API_KEY={SENTINEL}\n",
    "secrets/hf_token": SENTINEL,
    "notebooks/.env": SENTINEL,
    "data/private.jsonl": f'{{"instruction": "{SENTINEL}", "output": "x"}}\n',
    "outputs/quickstart/adapter/run.json": f'{{"token": "{SENTINEL}"}}',
    ".git/config": f"[credential]\n\thelper = store {SENTINEL}\n",
    "id_rsa.key": SENTINEL,
}


def build(context: Path, tag: str) -> subprocess.CompletedProcess:
    """The same build as run.sh's: Podman with the machine's glue, or plain docker build."""
    if os.environ.get("QLORA_ENGINE") == "docker":
        cmd = ["docker", "build", "-f", str(context / "docker" / "Dockerfile"), "-t", tag, str(context)]
        env = os.environ
    else:
        cmd = [str(ROOT / "tests" / "containers" / "build-image.sh")]
        env = {**os.environ, "IMAGE": tag, "CONTEXT": str(context)}
    print(f"[image] {shlex.join(cmd)}")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def private_image(tmp_path_factory):
    """The image built from a checkout that holds secrets, data, outputs and a .git folder."""
    context = copy_project(tmp_path_factory.mktemp("context"))
    for name, content in PRIVATE.items():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(content)
    tag = f"localhost/qlora-stack:ignore-test-{uuid.uuid4().hex[:8]}"
    done = build(context, tag)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    yield tag
    EngineAPI().request("DELETE", f"/images/{tag.replace('/', '%2F')}?force=1")


def run_in(image: str, *command: str) -> str:
    """A throwaway container of the image itself (no compose, no mounts)."""
    name = f"qlora-image-test-{uuid.uuid4().hex[:8]}"
    engine = os.environ.get("QLORA_ENGINE", "podman")
    base = ["docker"] if engine == "docker" else ["podman", "--runtime", "runc"]
    done = subprocess.run(
        [*base, "run", "--name", name, "--network", "none", image, *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    EngineAPI().remove(name)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_no_secret_data_outputs_or_git_reaches_the_image(private_image):
    # grep every file the build copied or created (the venv is installed from PyPI before the
    # project is copied, so it cannot hold them), and list what is there.
    found = run_in(
        private_image,
        "sh",
        "-c",
        f"grep -rl {SENTINEL} /workspace /home /tmp /root /etc 2>/dev/null; "
        "ls -A /workspace; ls -A /workspace/outputs",
    )
    assert SENTINEL not in found
    top = set(found.split())
    assert not top & {".env", ".env.local", "secrets", "data", ".git", "id_rsa.key", "quickstart"}
    assert {"training", "serving", "notebooks", "pyproject.toml", "docker"} <= top


def test_the_image_runs_as_a_numeric_non_root_user_under_tini(image):
    status, data = EngineAPI().request("GET", f"/images/{image.replace('/', '%2F')}/json")
    assert status == 200
    config = data["Config"]
    uid, _, gid = config["User"].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit()
    assert config["Entrypoint"][:2] == ["/usr/bin/tini", "--"]
    out = run_in(
        image,
        "sh",
        "-c",
        "id -u; tr '\\0' ' ' </proc/1/cmdline; echo; test -f /etc/jupyter/jupyter_server_config.py && echo jupyter-config",
    )
    lines = out.strip().splitlines()
    assert lines[0] == uid and lines[1].startswith("/usr/bin/tini") and lines[2] == "jupyter-config"
