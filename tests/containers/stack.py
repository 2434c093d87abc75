"""Drive the project's compose.yaml in real containers: Docker Compose v2 against a Docker-API
socket (Podman's here and in CI, Docker's on a workstation).

tests/containers/run.sh (`make test-containers`) sets the engine up, builds the image and
exports what these tests need; without it they are skipped.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENABLED = os.environ.get("QLORA_CONTAINER_TESTS") == "1"
SKIP_REASON = (
    "container tests run with `make test-containers` (it builds the image and starts Podman or Docker)"
)
pytestmark = [pytest.mark.containers, pytest.mark.skipif(not ENABLED, reason=SKIP_REASON)]

# Sentinels for the secrets: they must reach the containers as files and appear nowhere else.
HF_SENTINEL = "hf_SentinelTokenForContainerTests0123"
WANDB_SENTINEL = "wandb-sentinel-key-0123456789abcdef"
# compose.yaml's settings that a developer's shell may hold; the tests set their own.
SETTINGS = (
    "RECIPE", "RUN", "NUM_SHARD", "NOTEBOOK_PORT", "SERVE_PORT", "SERVE_BIND", "API_KEY", "USER_UID",
    "USER_GID", "HF_TOKEN", "WANDB_API_KEY", "JUPYTER_TOKEN", "COMPOSE_FILE", "COMPOSE_PROFILES",
    "COMPOSE_PROJECT_NAME", "HF_HUB_OFFLINE", "MAX_INPUT_TOKENS", "MAX_TOTAL_TOKENS", "LORA_BASE_MODEL",
    "LORA_ADAPTERS", "QUANTIZE", "DTYPE", "SHM_SIZE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_ARGS", "QUANT",
    "GGUF_QUANT",
)  # fmt: skip
TIMEOUT = 900  # seconds for any one compose command: a stuck container fails the test, not CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineAPI:
    """The Docker Engine API on DOCKER_HOST's unix socket (Podman serves the same API)."""

    def __init__(self) -> None:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        if not host.startswith("unix://"):
            raise RuntimeError(f"DOCKER_HOST={host}: only unix sockets are supported here")
        self.socket_path = host.removeprefix("unix://")

    def request(self, method: str, path: str) -> tuple[int, object]:
        conn = http.client.HTTPConnection("localhost", timeout=60)
        conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.sock.settimeout(60)
        conn.sock.connect(self.socket_path)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        return response.status, (json.loads(body) if body.strip().startswith((b"{", b"[")) else body)

    def inspect(self, container: str) -> dict:
        status, data = self.request("GET", f"/containers/{urllib.parse.quote(container)}/json")
        assert status == 200, f"inspect {container}: {status} {data}"
        return data

    def remove(self, container: str) -> None:
        self.request("DELETE", f"/containers/{urllib.parse.quote(container)}?force=1&v=1")


@dataclass
class Result:
    args: list[str]
    returncode: int
    output: str  # stdout and stderr together, as a person would read them

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    def ok(self) -> Result:
        assert self.returncode == 0, f"{shlex.join(self.args)} exited {self.returncode}:\n{self.tail()}"
        return self


@dataclass(frozen=True)
class Stopped:
    exit_code: int
    seconds: float
    logs: str

    def __str__(self) -> str:
        return f"exit {self.exit_code} after {self.seconds:.1f} s:\n{self.logs[-3000:]}"


@dataclass
class Stack:
    """One compose project: a copy of the project, its own name, ports and settings."""

    project: str
    directory: Path
    files: tuple[str, ...] = ("compose.yaml", "compose.cpu.yaml")
    env: dict[str, str] = field(default_factory=dict)
    api: EngineAPI = field(default_factory=EngineAPI)
    _runs: int = 0

    @property
    def command(self) -> list[str]:
        base = shlex.split(os.environ.get("QLORA_COMPOSE", "docker-compose"))
        files = [arg for f in self.files for arg in ("-f", f)]
        return [*base, "-p", self.project, "--project-directory", str(self.directory), *files]

    def compose(
        self, *args: str, env: dict | None = None, timeout: float = TIMEOUT, profiles=("cpu",)
    ) -> Result:
        cmd = [*self.command, *(a for p in profiles for a in ("--profile", p)), *args]
        started = time.perf_counter()
        try:
            done = subprocess.run(
                cmd,
                cwd=self.directory,
                env={**self.env, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            raise AssertionError(f"{shlex.join(cmd)} did not finish in {timeout} s:\n{out[-4000:]}") from None
        print(f"[stack] {shlex.join(args[:8])} -> {done.returncode} in {time.perf_counter() - started:.1f} s")
        return Result(cmd, done.returncode, done.stdout)

    def run(self, service: str, *command: str, env: dict | None = None, timeout: float = TIMEOUT) -> Result:
        """A one-off container of `service`, removed afterwards; its exit status comes back.

        Not `run --rm`: with Podman, compose then loses the exit status (the container is gone
        before compose asks for it). The container is removed here instead.
        """
        self._runs += 1
        name = f"{self.project}-{service}-run{self._runs}"
        flags = [a for k in (env or {}) for a in ("-e", k)]
        try:
            return self.compose(
                "run", "--no-deps", "-T", "--name", name, *flags, service, *command, env=env, timeout=timeout
            )
        finally:
            self.api.remove(name)

    def run_named(self, name: str, service: str, *command: str, env: dict | None = None) -> Result:
        """Like run, but the container stays for inspection (removed by down)."""
        flags = [a for k in (env or {}) for a in ("-e", k)]
        return self.compose("run", "--no-deps", "-T", "--name", name, *flags, service, *command, env=env)

    def up(self, service: str, port: str, *, wait_timeout: int, **env: str) -> Result:
        """A server started (recreated, with these settings) on host port `port` and waited for until
        healthy; its logs are printed when it is not."""
        result = self.compose(
            "up", "-d", "--wait", "--wait-timeout", str(wait_timeout), "--force-recreate", service,
            env={"SERVE_PORT": port, **env},
        )  # fmt: skip
        if result.returncode != 0:
            print(self.logs(service))
        return result.ok()

    def stop(self, service: str, port: str) -> Stopped:
        """`compose stop` of a server started by `up`, then its removal: how it ended."""
        container = self.container(service)
        started = time.monotonic()
        self.compose("stop", service, env={"SERVE_PORT": port}).ok()
        took = time.monotonic() - started
        exit_code = self.api.inspect(container)["State"]["ExitCode"]
        logs = self.logs(service)
        self.compose("rm", "-f", "-s", service, env={"SERVE_PORT": port})
        return Stopped(exit_code, took, logs)

    def container(self, service: str) -> str:
        return f"{self.project}-{service}-1"

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-log-prefix", "--no-color", service).output

    def down(self) -> Result:
        return self.compose(
            "down", "--volumes", "--remove-orphans", "--timeout", "5", profiles=("cpu", "gpu")
        )


def copy_project(target: Path) -> Path:
    """The files git would commit (tracked, or new and not ignored), as a user's checkout has them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():  # deleted but not yet committed: skip
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def image_user(image: str) -> tuple[int, int]:
    """UID and GID the image runs as (its USER), so the project copy can be theirs, as a user's is."""
    status, data = EngineAPI().request("GET", f"/images/{urllib.parse.quote(image, safe='')}/json")
    assert status == 200, f"image {image} not found: build it first (tests/containers/run.sh does)"
    uid, _, gid = data["Config"]["User"].partition(":")
    return int(uid), int(gid or uid)


def stack_env(image: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(
        QLORA_IMAGE=image,
        VLLM_CPU_IMAGE=os.environ.get("VLLM_CPU_IMAGE", "qlora-stack-vllm-cpu:latest"),
        LLAMACPP_IMAGE=os.environ.get("LLAMACPP_IMAGE", "qlora-stack-llamacpp:latest"),
        HF_TOKEN=HF_SENTINEL,
        WANDB_API_KEY=WANDB_SENTINEL,
        JUPYTER_TOKEN="",
        HF_HUB_OFFLINE="1",  # no hub here; the tiny models are built offline
        NOTEBOOK_PORT=str(free_port()),
        SERVE_PORT=str(free_port()),
        **settings,
    )
    return env


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
