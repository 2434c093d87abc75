"""The container files as written: compose.yaml and its CPU override, .env.example, the image's
entry point and Jupyter config, .dockerignore, the notebooks and the Makefile's verbs.

Fast and engine-free, so they run with `make test`; tests/containers/ runs the same files in
real containers (`make test-containers`).
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from serving.backends.tgi import IMAGE as TGI_IMAGE
from serving.backends.vllm import IMAGE as VLLM_IMAGE
from serving.backends.vllm import SHUTDOWN_TIMEOUT
from tests.conftest import ROOT
from tests.notebook_outputs import notebooks, problems

SECRETS = {"hf_token": "HF_TOKEN", "wandb_api_key": "WANDB_API_KEY", "jupyter_token": "JUPYTER_TOKEN"}
APP_SERVICES = ("train", "merge", "notebook")
LONG_RUNNING = ("notebook", "tgi", "vllm", "serve-cpu", "vllm-cpu", "serve-llamacpp")
GPU_SERVICES = ("train", "merge", "notebook", "tgi", "vllm")
# Services the CI starts under Podman, whose API compose treats as older than Docker Engine 25.
STARTED_IN_CI = ("train", "merge", "export", "notebook", "serve-cpu", "vllm-cpu", "serve-llamacpp")


class ComposeLoader(yaml.SafeLoader):
    """PyYAML plus compose's !reset and !override tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else None,
)


def load(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(encoding="utf-8"), Loader=ComposeLoader)  # noqa: S506 - SafeLoader subclass


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("compose.yaml")


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def seconds(duration: str) -> float:
    """A compose duration (1m30s, 90s, 5m, 2h) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def mounts(service: dict) -> dict[str, str]:
    """target -> 'source[:ro]' of a service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = source + (":ro" if mode == ["ro"] else "")
    return out


def test_services_and_the_two_shared_volumes(compose, services):
    assert {
        "train",
        "merge",
        "export",
        "notebook",
        "tgi",
        "vllm",
        "serve-cpu",
        "vllm-cpu",
        "serve-llamacpp",
    } <= set(services)
    assert set(compose["volumes"]) == {"hf-cache", "outputs"}
    assert services["tgi"]["profiles"] == ["gpu"] and services["vllm"]["profiles"] == ["gpu"]
    assert services["serve-cpu"]["profiles"] == ["cpu"] and services["vllm-cpu"]["profiles"] == ["cpu"]
    assert services["serve-llamacpp"]["profiles"] == ["cpu"]
    for name in (*APP_SERVICES, "export"):
        assert "profiles" not in services[name], f"{name} must run without naming a profile"


@pytest.mark.parametrize("name", [*APP_SERVICES, "export"])
def test_the_project_images_services_share_outputs_and_cache_and_read_data_and_recipes_only(services, name):
    m = mounts(services[name])
    assert m["/workspace/outputs"] == "outputs"  # read-write: train writes, merge writes merged/
    assert m["/home/app/.cache/huggingface"] == "hf-cache"
    assert m["/workspace/data"] == "./data:ro" and m["/workspace/recipes"] == "./recipes:ro"
    assert services[name]["image"].endswith("qlora-stack:latest}")  # ${QLORA_IMAGE:-qlora-stack:latest}


@pytest.mark.parametrize("name", ["tgi", "vllm", "serve-cpu", "vllm-cpu", "serve-llamacpp"])
def test_servers_read_outputs_read_only(services, name):
    assert mounts(services[name])["/outputs"] == "outputs:ro"


def test_only_the_notebook_mounts_the_project(services):
    assert mounts(services["notebook"])["/workspace"] == "."
    assert "/workspace" not in mounts(services["train"]) and "/workspace" not in mounts(services["merge"])


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_services_reserve_nvidia_gpus(services, name):
    (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_cpu_override_drops_every_gpu_reservation_of_a_service_the_cpu_runs(services):
    override = load("compose.cpu.yaml")["services"]
    needs_reset = {n for n, s in services.items() if "deploy" in s and "gpu" not in s.get("profiles", [])}
    assert needs_reset == set(APP_SERVICES)
    for name in needs_reset:
        assert override[name] == {"deploy": {"__reset__": True}}, f"compose.cpu.yaml must reset {name}.deploy"
    assert set(override) == needs_reset  # it changes nothing else


@pytest.mark.parametrize("name", ["train", "notebook", "tgi", "vllm", "vllm-cpu"])
def test_shared_memory_beyond_dockers_64_mb(services, name):
    assert "shm_size" in services[name]


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_healthchecks_podman_can_run(services, name):
    check = services[name]["healthcheck"]["test"]
    assert check[0] in ("CMD", "CMD-SHELL")
    if check[0] == "CMD":
        # Podman 4.3's Docker API splits exec-form arguments on spaces.
        assert not any(" " in arg for arg in check[1:]), check
    if name in STARTED_IN_CI:
        assert "start_interval" not in services[name]["healthcheck"], "compose refuses it with Podman"


def test_batch_jobs_have_no_healthcheck_and_no_restart(services):
    for name in ("train", "merge", "export"):
        assert "healthcheck" not in services[name] and "restart" not in services[name]


def test_grace_periods_cover_a_checkpoint_save_and_the_servers_drains(services):
    # Training answers SIGTERM by finishing its step and saving a checkpoint; compose's default
    # 10 s would SIGKILL a large model mid-save.
    assert seconds(services["train"]["stop_grace_period"]) >= 120
    # TGI drains requests for up to 90 s (--graceful-termination-timeout), then exits.
    assert seconds(services["tgi"]["stop_grace_period"]) > 90
    # vLLM, on GPUs and on the CPU, drains for up to SHUTDOWN_TIMEOUT, then stops in seconds.
    assert f"--shutdown-timeout={SHUTDOWN_TIMEOUT}" in services["vllm"]["command"]
    for name in ("vllm", "vllm-cpu"):
        assert seconds(services[name]["stop_grace_period"]) >= SHUTDOWN_TIMEOUT + 10, name


def test_every_service_names_its_grace_period_which_podman_would_take_as_zero(services):
    # The servers and Jupyter stop in seconds, but Podman's Docker API records an unset grace
    # period as 0 s and answers `compose stop` with a SIGKILL (tests/containers checks the clean stop).
    unnamed = [name for name, spec in services.items() if "stop_grace_period" not in spec]
    assert not unnamed, f"no stop_grace_period: {unnamed}"
    assert all(seconds(spec["stop_grace_period"]) >= 10 for spec in services.values())


def test_secrets_are_files_from_the_environment_never_environment_variables(compose, services):
    assert {name: spec["environment"] for name, spec in compose["secrets"].items()} == SECRETS
    text = (ROOT / "compose.yaml").read_text(encoding="utf-8")
    for variable in SECRETS.values():
        # Interpolated anywhere but in the secrets section, a secret would land in `docker inspect`.
        assert not re.search(r"\$\{?" + variable + r"\b", text), f"compose.yaml interpolates {variable}"
    for name, service in services.items():
        env = service.get("environment") or {}
        assert not set(env) & set(SECRETS.values()), f"{name} passes a secret as an environment variable"
        used = set(service.get("secrets", []))
        if "hf_token" in used:
            assert env["HF_TOKEN_PATH"] == "/run/secrets/hf_token"  # huggingface_hub reads it there
        if "wandb_api_key" in used:
            assert env["WANDB_API_KEY_FILE"] == "/run/secrets/wandb_api_key"
    for name in APP_SERVICES:
        assert {"hf_token", "wandb_api_key"} <= set(services[name]["secrets"])


def test_jupyterlab_is_local_only_non_root_and_its_token_is_a_file(services):
    nb = services["notebook"]
    assert nb["ports"] == ["127.0.0.1:${NOTEBOOK_PORT:-8888}:8888"]
    command = " ".join(nb["command"])
    assert command.startswith("jupyter lab ")
    for forbidden in ("--allow-root", "token", "NotebookApp", "password"):
        assert forbidden.lower() not in command.lower(), forbidden
    assert "user" not in nb  # the image's non-root user
    assert (
        "jupyter_token" in nb["secrets"]
        and nb["environment"]["JUPYTER_TOKEN_FILE"] == "/run/secrets/jupyter_token"
    )


def test_every_port_is_published_on_localhost_only(services):
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith(("127.0.0.1:", "${SERVE_BIND:-127.0.0.1}:")), f"{name}: {port}"


def test_env_example_documents_every_setting_and_ships_no_secret():
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    settings = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", text, flags=re.M))
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "compose.yaml").read_text(encoding="utf-8")))
    used |= set(SECRETS.values())
    commented = set(re.findall(r"^# ?([A-Z_][A-Z0-9_]*)=", text, flags=re.M))
    missing = sorted(used - set(settings) - commented)
    assert not missing, f".env.example does not mention {missing}"
    for variable in SECRETS.values():
        assert settings[variable] == "", f"{variable} must ship empty (and defined: compose needs it set)"
    for required in ("RECIPE", "NUM_SHARD", "NOTEBOOK_PORT", "SERVE_PORT", "USER_UID", "USER_GID"):
        assert required in settings


def test_the_build_context_leaves_out_secrets_data_outputs_and_git():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".env", "**/.env", ".env.*", "secrets", "data", "outputs", ".git", "export"} <= patterns
    # Nothing may re-include them.
    assert not [
        p for p in patterns if p.startswith("!") and re.search(r"env|secret|data|outputs|git|export", p)
    ]
    # The folder README's Disk section copies merged models into stays out of the context and of git.
    assert "mkdir -p export && docker compose run" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "/export/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.vllm-cpu"])
def test_dockerfile_takes_no_secret_and_runs_as_a_numeric_non_root_user(name):
    text = (ROOT / "docker" / name).read_text(encoding="utf-8")
    assert not re.search(r"^\s*(ARG|ENV)\s+\S*(TOKEN|SECRET|PASSWORD|API_KEY)", text, flags=re.M | re.I)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users == ["${USER_UID}:${USER_GID}"]
    assert "--allow-root" not in text
    if name == "Dockerfile":
        assert "/etc/jupyter/jupyter_server_config.py" in text


def test_the_gpu_image_installs_what_gpu_runs_use_by_default():
    # GPU runs turn Liger's kernels on by default only where liger-kernel is installed: the image must
    # carry the speed extra, or every container run would quietly train without them.
    import tomllib

    text = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    extras = re.search(r"^ARG EXTRAS=(\S+)$", text, flags=re.M).group(1).split(",")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert {"serve", "notebook", "speed"} <= set(extras) <= set(project["optional-dependencies"])
    assert any(r.startswith("liger-kernel==") for r in project["optional-dependencies"]["speed"])


def test_the_project_image_exports_gguf_from_a_wheel_built_in_a_stage_of_its_own():
    # The export service (make export with Docker) runs in this image: it needs the export extra, and
    # llama-cpp-python (a source distribution only) compiled once in a cached stage, not in the image.
    text = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert "export" in re.search(r"^ARG EXTRAS=(\S+)$", text, flags=re.M).group(1).split(",")
    build, final = text.split("\nFROM ${BASE_IMAGE}\n", 1)
    assert (
        "llama-cpp.sh wheel" in build and "llama-cpp.sh converter" in build and "--mount=type=cache" in build
    )
    assert "--only-binary llama-cpp-python" in final and "g++" not in final and "cmake" not in final
    assert "ENV LLAMA_CPP_CONVERTER=" in final


def test_the_llamacpp_image_builds_its_wheel_with_the_projects_script_and_runs_as_non_root():
    text = (ROOT / "docker" / "llamacpp.Dockerfile").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(ARG|ENV)\s+\S*(TOKEN|SECRET|PASSWORD|API_KEY)", text, flags=re.M | re.I)
    assert re.findall(r"^USER\s+(\S+)", text, flags=re.M) == ["65534:65534"]
    assert "docker/llama-cpp.sh wheel" in text and "--mount=type=cache" in text  # built once, then cached
    final = text.rsplit("\nFROM ", 1)[1]
    assert "g++" not in final and "cmake" not in final  # no compiler in the image that serves


# --- docker/jupyter_server_config.py: the token policy ----------------------------------------

CONFIG = ROOT / "docker" / "jupyter_server_config.py"


def jupyter_config(environ: dict) -> SimpleNamespace:
    """Run the config file as Jupyter does, with `get_config()` and an environment of our choosing."""
    c = SimpleNamespace(
        IdentityProvider=SimpleNamespace(),
        PasswordIdentityProvider=SimpleNamespace(),
        ServerApp=SimpleNamespace(),
    )
    module = runpy.run_path(str(CONFIG), init_globals={"get_config": lambda: c})
    c_again = SimpleNamespace(
        IdentityProvider=SimpleNamespace(),
        PasswordIdentityProvider=SimpleNamespace(),
        ServerApp=SimpleNamespace(),
    )
    module["configure"](c_again, environ)
    return c_again


def test_jupyter_token_comes_from_the_secret_file(tmp_path, capsys):
    token = "a" * 16 + "0123456789abcdef0123456789abcdef"
    (tmp_path / "token").write_text(token + "\n")
    c = jupyter_config({"JUPYTER_TOKEN_FILE": str(tmp_path / "token")})
    assert c.IdentityProvider.token == token
    assert c.ServerApp.allow_root is False and c.PasswordIdentityProvider.allow_password_change is False
    assert token not in capsys.readouterr().err  # a chosen token is not printed


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_without_a_token_jupyter_gets_a_random_32_byte_one_printed_once(tmp_path, capsys, content):
    environ = {"NOTEBOOK_PORT": "18888"}
    if content is not None:
        (tmp_path / "token").write_text(content)
        environ["JUPYTER_TOKEN_FILE"] = str(tmp_path / "token")
    first, second = (
        jupyter_config(environ).IdentityProvider.token,
        jupyter_config(environ).IdentityProvider.token,
    )
    assert re.fullmatch(r"[0-9a-f]{64}", first) and first != second
    assert f"http://127.0.0.1:18888/lab?token={first}" in capsys.readouterr().err


@pytest.mark.parametrize("weak", ["short", "x" * 31, "has spaces in the middle of it, 40 chars"])
def test_a_weak_token_stops_jupyter(tmp_path, weak):
    (tmp_path / "token").write_text(weak)
    with pytest.raises(
        SystemExit, match="at least 32"
    ):  # SystemExit: traitlets would log an Exception and go on
        jupyter_config({"JUPYTER_TOKEN_FILE": str(tmp_path / "token")})


def test_a_token_in_the_environment_is_ignored(capsys):
    c = jupyter_config({"JUPYTER_TOKEN": "b" * 64})
    assert c.IdentityProvider.token != "b" * 64
    assert "ignoring JUPYTER_TOKEN" in capsys.readouterr().err


# --- docker/entrypoint.sh ---------------------------------------------------------------------


def entrypoint(tmp_path: Path, env: dict, code: str) -> str:
    done = subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh"), sys.executable, "-c", code],
        env={"PATH": os.environ["PATH"], "HF_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_entrypoint_hands_the_wandb_key_file_to_wandb_and_leaves_hf_to_its_token_file(tmp_path):
    (tmp_path / "wandb").write_text("w4ndb-key\n")
    code = "import os; print(os.environ.get('WANDB_API_KEY'), os.environ.get('HF_TOKEN'))"
    assert entrypoint(tmp_path, {"WANDB_API_KEY_FILE": str(tmp_path / "wandb")}, code) == "w4ndb-key None"
    assert entrypoint(tmp_path, {"WANDB_API_KEY_FILE": str(tmp_path / "missing")}, code) == "None None"
    # A key set explicitly wins over the file.
    env = {"WANDB_API_KEY_FILE": str(tmp_path / "wandb"), "WANDB_API_KEY": "explicit"}
    assert entrypoint(tmp_path, env, code) == "explicit None"


def test_entrypoint_execs_the_command_so_signals_reach_it(tmp_path):
    # exec: the command replaces the shell, keeping its PID, so tini's SIGTERM reaches it.
    pid_of_command, pid_of_shell = entrypoint(
        tmp_path, {}, "import os; print(os.getpid(), os.getppid())"
    ).split()
    assert pid_of_command != pid_of_shell
    text = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert re.search(r'^exec "\$@"$', text, flags=re.M)


def test_entrypoint_warns_of_a_writable_mount_it_cannot_write_not_of_a_read_only_root():
    """The servers and the chat client run on a read-only root: the image's /workspace/outputs is
    not writable there, and that is no reason to tell the user to chown a host folder."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the entry point as another user")
    with Path("/proc/self/mountinfo").open() as f:
        options = {fields[4]: fields[5] for fields in (line.split() for line in f)}
    if not options.get("/", "").startswith("rw") or "/usr" in options:
        pytest.skip("needs / as a writable mount and /usr as a folder of it")

    def stderr_as_nobody(hf_home: str) -> str:
        done = subprocess.run(
            [
                setpriv,
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sh",
                "docker/entrypoint.sh",
                "true",
            ],
            cwd=ROOT,
            env={"PATH": os.environ["PATH"], "HF_HOME": hf_home},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stderr

    # /: a writable mount that nobody cannot write, as a bind mount of another UID would be.
    assert "entrypoint: warning: / (owner UID 0) is not writable by UID 65534" in stderr_as_nobody("/")
    # /usr: root's folder, not a mount point of its own here, like the image's folders under a read-only root.
    assert "warning" not in stderr_as_nobody("/usr")


# --- notebooks -------------------------------------------------------------------------------


def test_the_three_notebooks_are_committed_without_outputs():
    names = [p.stem for p in notebooks(["notebooks"])]
    assert names == ["01_qlora_quickstart", "02_compare_models", "03_query_endpoint"]
    found = [line for path in notebooks(["notebooks"]) for line in problems(path)]
    assert not found, "\n".join(found) + "\nrun: make strip-notebooks"


def test_the_endpoint_notebook_finds_every_server_by_its_service_name(services):
    """03 runs in the notebook container: each server compose starts is reached as service:port."""
    cells = json.loads((ROOT / "notebooks" / "03_query_endpoint.ipynb").read_text(encoding="utf-8"))["cells"]
    source = "".join(line for cell in cells if cell["cell_type"] == "code" for line in cell["source"])
    for name in LONG_RUNNING[1:]:
        port = services[name]["ports"][0].rsplit(":", 1)[1]
        assert f'"http://{name}:{port}"' in source, f"03_query_endpoint does not try {name}"
    # ... and a server started with API_KEY answers its client only with the key.
    assert "API_KEY" in services["notebook"]["environment"] and "API_KEY" in source


def test_the_output_check_finds_outputs(tmp_path):
    nb = tmp_path / "x.ipynb"
    nb.write_text(
        '{"cells": [{"cell_type": "code", "execution_count": 3, "metadata": {}, "source": [], '
        '"outputs": [{"output_type": "stream", "name": "stdout", "text": ["hi"]}]}], '
        '"metadata": {}, "nbformat": 4, "nbformat_minor": 5}'
    )
    assert len(problems(nb)) == 2
    assert (
        subprocess.run(
            [sys.executable, "-m", "tests.notebook_outputs", "check", str(nb)], cwd=ROOT
        ).returncode
        == 1
    )
    subprocess.run([sys.executable, "-m", "tests.notebook_outputs", "strip", str(nb)], cwd=ROOT, check=True)
    assert problems(nb) == []


# --- Makefile ---------------------------------------------------------------------------------

VERBS = (
    "build",
    "train",
    "merge",
    "serve",
    "chat",
    "notebook",
    "pipeline",
    "bench",
    "test",
    "test-vllm",
    "vllm-venv",
    "test-containers",
    "lint",
    "clean",
)


def make(*args: str, cwd: Path = ROOT, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith(("MAKE", "RUNTIME", "COMPOSE"))}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True, env=env, **kw
    )


def test_make_help_lists_every_verb():
    out = make("help", "RUNTIME=local").stdout
    listed = set(re.findall(r"^  make (\S+)", out, flags=re.M))
    assert set(VERBS) <= listed, f"missing from make help: {set(VERBS) - listed}"


def test_make_in_docker_runs_the_compose_services():
    common = ("RUNTIME=docker", "STAMP=/dev/null", "RECIPE=recipes/quickstart.yaml")
    train = make("-n", "train", *common, "SET=training.max_steps=3", "FORCE=1").stdout
    assert re.search(
        r"docker compose .*run --rm train python -m training train --recipe recipes/quickstart.yaml "
        r"--set training.max_steps=3 --force",
        train,
    )
    assert "build train" in train  # the image is rebuilt from this source first (cached)
    merge = make("-n", "merge", *common).stdout
    assert re.search(
        r"run --rm merge python -m training merge --recipe recipes/quickstart.yaml[\s\\]+--num-shard \d",
        merge,
    )
    export = make("-n", "export", *common, "QUANT=q8_0,f16").stdout
    assert "build train" in export and re.search(
        r"run --rm export python -m training export --recipe recipes/quickstart.yaml --format gguf "
        r"--quant q8_0,f16",
        export,
    )
    notebook = make("-n", "notebook", *common).stdout
    assert "up -d --wait notebook" in notebook
    pipeline = make("-n", "pipeline", *common).stdout
    assert pipeline.index("run --rm train") < pipeline.index("run --rm merge") < pipeline.index("--wait tgi")


def test_make_serve_stop_stops_every_server_service(services):
    """Also those the README starts by hand (docker compose --profile cpu up -d --wait vllm-cpu)."""
    stop = make("-n", "serve-stop", "RUNTIME=docker").stdout
    named = set(re.search(r"rm --stop --force (.*)", stop).group(1).split())
    assert named == set(LONG_RUNNING[1:]) and set(LONG_RUNNING[1:]) <= set(services)


@pytest.mark.parametrize(
    ("running", "backend", "url"),
    [
        ("notebook serve-llamacpp", "tgi", "http://serve-llamacpp:8080"),  # make serve SERVE_BACKEND=llamacpp
        ("vllm-cpu", "tgi", "http://vllm-cpu:8000"),  # docker compose --profile cpu up -d vllm-cpu
        ("serve-cpu", "tgi", "http://serve-cpu:8080"),
        ("vllm", "tgi", "http://vllm:8000"),
        ("", "tgi", "http://tgi:80"),  # nothing runs: the one SERVE_BACKEND names (the error says so)
        ("", "llamacpp", "http://serve-llamacpp:8080"),
    ],
)
@pytest.mark.parametrize("verb", ["chat", "bench"])
def test_make_chat_and_bench_in_docker_ask_the_server_that_runs(tmp_path, running, backend, url, verb):
    fake = tmp_path / "compose"
    fake.write_text(
        f'#!/bin/sh\ncase " $* " in *" ps "*) for s in {running}; do echo $s; done;; *) echo "run: $*";; esac\n'
    )
    fake.chmod(0o755)
    done = make(
        verb, "RUNTIME=docker", f"COMPOSE={fake}", f"SERVE_BACKEND={backend}", cwd=make_project(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert f"-e SERVE_URL={url} serve-cpu" in done.stdout or f"-e SERVE_URL={url} --user" in done.stdout


def test_make_notebook_in_docker_shows_why_jupyterlab_did_not_start(tmp_path):
    fake = tmp_path / "compose"
    fake.write_text(
        '#!/bin/sh\ncase " $* " in *" up "*) echo "container notebook exited (1)" >&2; exit 1;;\n'
        '  *" logs "*) echo "[jupyter-config] the token in /run/secrets/jupyter_token is 5 characters";;\n'
        f'  *" rm "*) echo "$*" > {tmp_path}/removed;; esac\n'
    )
    fake.chmod(0o755)
    project = make_project(tmp_path)
    done = make("notebook", "RUNTIME=docker", f"COMPOSE={fake}", cwd=project)
    assert done.returncode != 0 and "is 5 characters" in done.stdout + done.stderr
    # Removed: a restart would keep the token file it was created with, even once JUPYTER_TOKEN is emptied.
    assert (tmp_path / "removed").read_text().split()[-3:] == ["--stop", "--force", "notebook"]


@pytest.mark.parametrize(
    ("backend", "has_gpu", "refused"),
    [("tgi", "", True), ("vllm", "", True), ("llamacpp", "", False), ("tgi", "yes", False)],
)
def test_make_serve_in_docker_without_gpus_refuses_the_gpu_servers_before_pulling_them(
    tmp_path, backend, has_gpu, refused
):
    fake = tmp_path / "compose"
    # `run` is the settings step (launch-env), which prints the settings to export.
    fake.write_text(
        '#!/bin/sh\necho "$*" >> "$0.log"\ncase " $* " in *" run "*) echo "export RUN=quickstart";; esac\n'
    )
    fake.chmod(0o755)
    done = make(
        "serve",
        "RUNTIME=docker",
        f"HAS_GPU={has_gpu}",
        f"COMPOSE={fake}",
        f"SERVE_BACKEND={backend}",
        cwd=make_project(tmp_path),
    )
    started = (tmp_path / "compose.log").read_text() if (tmp_path / "compose.log").exists() else ""
    if refused:
        assert (
            done.returncode == 2
            and f"{backend} needs NVIDIA GPUs" in done.stderr
            and "SERVE_BACKEND=llamacpp" in done.stderr
        )
        assert started == ""
    else:
        assert done.returncode == 0, done.stderr
        assert "up -d --wait" in started


def test_make_serve_in_docker_stops_when_the_settings_step_prints_nothing(tmp_path):
    # Podman's compose exits 0 from `run --rm` whatever the command returned: a refused setting then
    # printed its error, no settings, and the server was started anyway.
    fake = tmp_path / "compose"
    fake.write_text('#!/bin/sh\necho "$*" >> "$0.log"\n')
    fake.chmod(0o755)
    done = make(
        "serve", "RUNTIME=docker", f"COMPOSE={fake}", "SERVE_BACKEND=llamacpp", cwd=make_project(tmp_path)
    )
    assert done.returncode != 0
    assert "up -d --wait" not in (tmp_path / "compose.log").read_text()


def test_make_lint_checks_compose_yaml_alone_even_when_env_names_the_cpu_override(tmp_path):
    project = make_project(tmp_path)
    (project / ".env").write_text("COMPOSE_FILE=compose.yaml:compose.cpu.yaml\n")
    lint = make("-n", "lint", "-o", ".venv/.installed", "-o", ".venv-tools/.installed", cwd=project).stdout
    assert re.search(r"env .*-u COMPOSE_FILE\b.*/docker-compose --env-file .env.example", lint)


def make_project(tmp_path: Path) -> Path:
    """The files make reads, copied: verbs that really run write .env beside the Makefile."""
    project = tmp_path / "project"
    project.mkdir()
    for name in (
        "Makefile",
        ".env.example",
        "pyproject.toml",
        "requirements.lock",
        "compose.yaml",
        "compose.cpu.yaml",
    ):
        shutil.copy(ROOT / name, project)
    return project


def test_make_refuses_a_recipe_the_containers_cannot_see(tmp_path):
    project = make_project(tmp_path)
    done = make(
        "train", "RUNTIME=docker", "STAMP=/dev/null", f"RECIPE={tmp_path}/r.yaml", "COMPOSE=true", cwd=project
    )
    assert done.returncode != 0 and "only recipes under recipes/" in done.stderr
    assert (project / ".env").is_file()  # the container verbs' settings, written where make ran


def show_env_target(project: Path) -> None:
    with (project / "Makefile").open("a") as f:
        f.write('\nshow-env:\n\t@echo "HF_HUB_OFFLINE=$$HF_HUB_OFFLINE SERVE_PORT=$$SERVE_PORT"\n')


@pytest.mark.parametrize(
    ("environment", "arguments", "expected"),
    [
        ({}, (), "HF_HUB_OFFLINE=0 SERVE_PORT=9090"),  # .env's defaults reach the commands
        ({"HF_HUB_OFFLINE": "1"}, (), "HF_HUB_OFFLINE=1 SERVE_PORT=9090"),  # the environment wins
        ({"HF_HUB_OFFLINE": "1"}, ("HF_HUB_OFFLINE=2",), "HF_HUB_OFFLINE=2 SERVE_PORT=9090"),  # then make's
    ],
)
def test_env_file_holds_defaults_that_the_environment_and_command_line_override(
    tmp_path, monkeypatch, environment, arguments, expected
):
    project = make_project(tmp_path)
    (project / ".env").write_text("HF_HUB_OFFLINE=0\nSERVE_PORT=9090\n")
    show_env_target(project)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SERVE_PORT", raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    done = make("show-env", "RUNTIME=local", *arguments, cwd=project)
    assert done.stdout.strip() == expected, done.stderr


def fake_id(tmp_path: Path, uid: int) -> dict[str, str]:
    """PATH with an `id` that reports `uid`: the check must not depend on who runs the tests."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "id").write_text(f'#!/bin/sh\n[ "$1" = -u ] && echo {uid} || exec /usr/bin/id "$@"\n')
    (bin_dir / "id").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_make_notebook_as_root_stops_before_installing_anything(tmp_path):
    project = make_project(tmp_path)
    venv = f"VENV={tmp_path / 'venv'}"  # absent: make would install JupyterLab into it first
    root = {**os.environ, **fake_id(tmp_path / "root", 0)}
    done = make("-n", "notebook", "RUNTIME=local", venv, cwd=project, env=root)
    assert done.returncode != 0 and "NOTEBOOK_ALLOW_ROOT=1" in done.stderr
    assert "pip install" not in done.stdout  # refused while the Makefile is read, before any step
    allowed = make("-n", "notebook", "RUNTIME=local", venv, "NOTEBOOK_ALLOW_ROOT=1", cwd=project, env=root)
    assert allowed.returncode == 0, allowed.stderr
    assert (
        "pip install" in allowed.stdout
        and "jupyter lab" in allowed.stdout
        and "--allow-root" in allowed.stdout
    )
    user = make(
        "-n",
        "notebook",
        "RUNTIME=local",
        venv,
        cwd=project,
        env={**os.environ, **fake_id(tmp_path / "user", 1000)},
    )
    assert user.returncode == 0 and "--allow-root" not in user.stdout


def test_make_estimate_passes_a_config_file():
    done = make("-n", "estimate", "RUNTIME=local", "STAMP=/dev/null", "CONFIG=bench/configs/llama-2-7b.json")
    assert "--config bench/configs/llama-2-7b.json" in done.stdout


def test_make_train_passes_profile():
    done = make("-n", "train", "RUNTIME=local", "STAMP=/dev/null", "PROFILE=3")
    assert re.search(r"-m training train --recipe \S+ .*--profile 3", done.stdout)


def test_make_serve_without_docker_refuses_a_misspelled_backend():
    done = make("serve", "RUNTIME=local", "STAMP=/dev/null", "SERVE_BACKEND=vlm")
    assert done.returncode == 2
    assert "SERVE_BACKEND must be vllm, local or llamacpp here" in done.stderr and "not 'vlm'" in done.stderr


def test_make_serve_serves_the_run_the_recipe_names(tmp_path, monkeypatch):
    # RUN was the recipe's file name: a recipe copied from quickstart.yaml with its own run_name trained
    # and merged outputs/<run_name>, and make serve with the same RECIPE looked for outputs/<file>/merged.
    monkeypatch.delenv("RUN", raising=False)
    project = make_project(tmp_path)
    recipe = tmp_path / "my-ja.yaml"
    recipe.write_text((ROOT / "recipes/quickstart.yaml").read_text().replace("quickstart", "my-ja-run"))
    serve = ("-n", "serve", "RUNTIME=local", f"VENV={sys.prefix}", "STAMP=/dev/null", f"RECIPE={recipe}")
    assert "--run my-ja-run --port" in make(*serve, cwd=project).stdout
    assert "--run other --port" in make(*serve, "SET=output.run_name=other", cwd=project).stdout
    assert "--run mine --port" in make(*serve, "RUN=mine", cwd=project).stdout
    recipe.write_text(recipe.read_text().replace("  run_name: my-ja-run\n", ""))
    assert "--run my-ja --port" in make(*serve, cwd=project).stdout  # no run_name: the file's name


def test_make_clean_asks_first_and_keeps_everything_without_a_yes(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "outputs" / "quickstart").mkdir(parents=True)
    # A compose project that cannot exist, so a Docker engine here loses no volume to this test.
    project = f"COMPOSE_PROJECT=qlora-clean-test-{os.getpid()}"
    done = make("clean", project, cwd=tmp_path, stdin=subprocess.DEVNULL)  # CI: no terminal, no answer
    assert "outputs/" in done.stdout and "kept" in done.stdout
    assert (tmp_path / "outputs" / "quickstart").is_dir()
    done = make("clean", project, cwd=tmp_path, input="n\n")
    assert (tmp_path / "outputs" / "quickstart").is_dir()
    make("clean", project, "YES=1", cwd=tmp_path, check=True)
    assert not (tmp_path / "outputs").exists()


# --- docker/pin-images.sh: TGI_IMAGE and VLLM_IMAGE pinned by digest in .env -----------------
# No registry is reachable here, so `skopeo` is a stand-in on PATH that prints a fixed manifest
# for the reference it is asked about; the script's part (the digest of the raw manifest, the
# .env rewrite) runs for real.
FAKE_SKOPEO = """#!/bin/sh
[ "$1 $2" = "inspect --raw" ] || { echo "unexpected: $*" >&2; exit 2; }
case "$3" in *@*) echo "asked for a digest reference: $3" >&2; exit 2;; esac
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","ref":"%s"}' "$3"
"""


def pin_images(tmp_path: Path, env_file: Path, skopeo: bool = True) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if skopeo:
        (bin_dir / "skopeo").write_text(FAKE_SKOPEO)
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 1\n")  # no buildx: the skopeo path
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(
        ["bash", str(ROOT / "docker" / "pin-images.sh"), str(env_file)],
        env=env,
        capture_output=True,
        text=True,
    )


def expected_digest(tag: str) -> str:
    import hashlib

    index = '"mediaType":"application/vnd.oci.image.index.v1+json"'
    manifest = f'{{"schemaVersion":2,{index},"ref":"docker://{tag}"}}'
    return "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


def test_pin_images_writes_tag_at_digest_into_env_and_keeps_everything_else(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(f"HF_TOKEN=hf_x\nTGI_IMAGE={TGI_IMAGE}\nSERVE_PORT=9000\n")
    env_file.chmod(0o600)
    done = pin_images(tmp_path, env_file)
    assert done.returncode == 0, done.stderr
    tgi = f"{TGI_IMAGE}@{expected_digest(TGI_IMAGE)}"
    vllm = f"{VLLM_IMAGE}@{expected_digest(VLLM_IMAGE)}"  # not in .env: the default, appended
    assert env_file.read_text() == f"HF_TOKEN=hf_x\nTGI_IMAGE={tgi}\nSERVE_PORT=9000\nVLLM_IMAGE={vllm}\n"
    assert env_file.stat().st_mode & 0o777 == 0o600  # .env holds secrets: its mode stays
    # Pinned already: resolved again from the tag (a stale digest is replaced), same result.
    env_file.write_text(env_file.read_text().replace(expected_digest(TGI_IMAGE), "sha256:" + "0" * 64))
    again = pin_images(tmp_path, env_file)
    assert again.returncode == 0, again.stderr
    assert f"TGI_IMAGE={tgi}\n" in env_file.read_text() and f"VLLM_IMAGE={vllm} (unchanged)" in again.stdout


def test_pin_images_fails_loudly_without_a_registry_tool(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("TGI_IMAGE=ghcr.io/huggingface/text-generation-inference:3.3.7\n")
    if shutil.which("skopeo", path="/usr/bin:/bin"):
        pytest.skip("skopeo is installed here")
    done = pin_images(tmp_path, env_file, skopeo=False)
    assert done.returncode != 0 and "skopeo" in done.stderr
    assert env_file.read_text() == "TGI_IMAGE=ghcr.io/huggingface/text-generation-inference:3.3.7\n"
