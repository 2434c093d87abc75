"""Several processes: a real 2-process DDP run (gloo, CPU) through `accelerate launch`, and the
settings that must be refused before anything starts."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import read_run, train_in_process
from training import cli
from training.errors import CheckpointError, RecipeError
from training.model.loading import Device, quantization_config
from training.recipe import load_recipe
from training.train.checkpoints import MARKER, check_resumable, checkpoints, mark_complete
from training.train.distributed import shards_weights
from training.train.hardware import hardware_notes, hardware_problems
from training.train.launcher import accelerate_command, topology
from training.train.sft_config import build_sft_config, sft_kwargs

QUICK = "recipes/quickstart.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_command(out: Path, *overrides: str) -> list[str]:
    """What a user types for two processes on one machine, in accelerate's own flag spelling.

    The recipe says strategy none: two processes make it ddp.
    """
    cmd = [sys.executable, "-m", "training", "train", "--recipe", QUICK, "--gpus", "2"]
    cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    for o in [f"output.dir={out}", *overrides]:
        cmd += ["--set", o]
    return cmd


@pytest.fixture(scope="module")
def ddp_interrupted(tiny_dir, tmp_path_factory) -> Path:
    """Two gloo processes launched by `accelerate launch`, stopped by SIGTERM after a few steps."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = ddp_command(out, "training.max_steps=400", "training.save_steps=1000", "training.eval_steps=1000")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "Trainable parameters" in line:
            break
    time.sleep(3)  # a few optimizer steps
    proc.send_signal(signal.SIGTERM)  # to the supervisor, as `docker stop` does
    _, err = proc.communicate(timeout=240)
    log = "".join(seen) + err
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "accelerate launch" in log and "processes were asked for: using ddp" in log
    return out / "quickstart"


@pytest.mark.slow
def test_ddp_run_saves_a_complete_checkpoint_of_both_processes(ddp_interrupted):
    saved = checkpoints(ddp_interrupted / "checkpoints")
    assert len(saved) == 1
    step, path = saved[0]
    assert 0 < step < 400
    marker = json.loads((path / MARKER).read_text())
    assert marker["world_size"] == 2 and marker["step"] == step
    # Each process saved its own RNG state; rank 0 alone wrote the rest.
    assert (path / "rng_state_0.pth").is_file() and (path / "rng_state_1.pth").is_file()
    assert (path / "optimizer.pt").is_file() and (path / "adapter_model.safetensors").is_file()
    run = read_run(ddp_interrupted)
    assert run["status"] == "interrupted" and run["global_step"] == step
    assert run["processes"] == {"world_size": 2, "processes_per_machine": 2}
    recipe = json.loads((ddp_interrupted / "recipe.json").read_text())
    assert recipe["distributed"]["strategy"] == "ddp"
    assert not (ddp_interrupted / "adapter").exists()


@pytest.mark.slow
def test_ddp_run_resumes_on_two_processes_and_finishes(ddp_interrupted, tmp_path):
    run_dir = tmp_path / "quickstart"
    shutil.copytree(ddp_interrupted, run_dir)
    step, _ = checkpoints(run_dir / "checkpoints")[0]
    cmd = ddp_command(tmp_path, f"training.max_steps={step + 2}", "training.save_steps=1000")
    cmd.append("--measure-memory")  # per-rank tensor peaks, passed on through the launcher
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = read_run(run_dir)
    assert run["status"] == "complete" and run["resumed_from"].endswith(f"checkpoint-{step}")
    m = run["metrics"]
    assert m["global_step"] == step + 2
    assert len(m["peak_memory_bytes_per_rank"]) == 2 and m["peak_memory_bytes"] > 0
    assert m["tokens_per_second"] > 0 and m["tokens_per_second_per_device"] > 0
    # One adapter, written by rank 0 through the shared temporary path, nothing left beside it.
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "run.json").is_file()
    assert not list(run_dir.glob(".adapter*"))
    assert "training_args.bin" not in {p.name for p in adapter.iterdir()}


@pytest.mark.slow
def test_a_save_that_fails_in_one_process_ends_the_run_in_one_line_per_process(ddp_interrupted, tmp_path):
    """A full disk at a save of a 2-process run, as a file size limit (no root needed) that the saved
    weights exceed. Rank 0 printed its one-line error; then rank 1, waiting for it at a
    barrier, printed the lost connection's traceback, torchrun's report another, and the run ended
    with status 1: the one line that says what to do was lost among 70."""
    run_dir = tmp_path / "quickstart"
    shutil.copytree(ddp_interrupted, run_dir)
    step, _ = checkpoints(run_dir / "checkpoints")[0]
    cmd = ddp_command(tmp_path, f"training.max_steps={step + 1}", "training.save_steps=1000")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    done = subprocess.run(cmd, preexec_fn=small_files, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    # The last step's checkpoint, the first file over the limit.
    assert (
        f"error: {run_dir / 'checkpoints'}/checkpoint-{step + 1}: File too large. Free space there"
        in done.stderr
    )
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
    # Rank 1 says why it stopped, unless torchrun stopped it first (SIGTERM, which prints nothing).
    rank_1 = [line for line in done.stderr.splitlines() if line.startswith("error (rank 1)")]
    assert all("another process of this run stopped while this one waited for it" in x for x in rank_1), (
        rank_1
    )
    assert not (run_dir / "adapter").exists() and [s for s, _ in checkpoints(run_dir / "checkpoints")] == [
        step
    ]


def test_a_process_that_crashes_ends_the_run_with_its_status_and_its_own_traceback_only(tmp_path):
    """The launcher as `train` starts it, on a script whose rank 1 has a bug: its traceback stays (a
    bug's), torchrun's ChildFailedError report of it does not, and the run ends with rank 1's status."""
    script = tmp_path / "crash.py"
    script.write_text('import os\nif os.environ["RANK"] == "1":\n    raise RuntimeError("a bug in rank 1")\n')
    launch = accelerate_command(topology("ddp", visible_gpus=0, gpus=2), [])
    assert launch[-2:] == ["-m", "training"]
    cmd = [*launch[:-2], str(script)]  # the script instead of `-m training`
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "RuntimeError: a bug in rank 1" in done.stderr
    assert "error: the process of rank 1 stopped with status 1 (its error is above)" in done.stderr
    assert "ChildFailedError" not in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused(ddp_interrupted, tmp_path):
    shutil.copytree(ddp_interrupted, tmp_path / "quickstart")
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) and this run has 1"):
        train_in_process(QUICK, tmp_path, "distributed.strategy=ddp", "training.max_steps=400")


def test_checkpoint_of_two_processes_needs_both_rng_states(tmp_path):

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    for name in ("trainer_state.json", "scheduler.pt", "optimizer.pt", "adapter_model.safetensors"):
        (ckpt / name).write_bytes(b"x")
    (ckpt / "rng_state_0.pth").write_bytes(b"x")
    mark_complete(ckpt, 4, world_size=2)
    with pytest.raises(CheckpointError, match="rng_state_1.pth"):
        check_resumable(ckpt, "ddp", 2)
    (ckpt / "rng_state_1.pth").write_bytes(b"x")
    check_resumable(ckpt, "ddp", 2)


# ---------------------------------------------------------------------------------------
# Refused before anything loads: exit code 2 and a message naming the key and what is allowed


def train_error(capsys, *args: str) -> str:
    start = time.time()
    code = cli.main(["train", "--recipe", QUICK, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert time.time() - start < 30  # no model was loaded, no process started
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharding_strategies_need_cuda(capsys, strategy):
    err = train_error(capsys, "--gpus", "2", "--set", f"distributed.strategy={strategy}")
    assert f"distributed.strategy {strategy} needs NVIDIA GPUs" in err
    assert "use strategy ddp" in err and "gloo" in err


def test_deepspeed_config_that_does_not_exist(capsys):
    err = train_error(
        capsys,
        "--gpus",
        "2",
        "--set",
        "distributed.strategy=deepspeed",
        "--set",
        "distributed.deepspeed.config=missing/ds.json",
    )
    assert "distributed.deepspeed.config 'missing/ds.json'" in err and "zero2, zero3" in err


def test_fsdp_cannot_shard_int8_or_gptq(tmp_path):
    for method in ("int8", "gptq"):
        with pytest.raises(RecipeError, match=rf"distributed.strategy fsdp cannot shard {method}.*nf4"):
            load_recipe(QUICK, ["distributed.strategy=fsdp", f"quantization.method={method}"])


def test_strategy_settings_apply_only_to_their_strategy():
    with pytest.raises(RecipeError, match="distributed.fsdp settings apply only with strategy: fsdp"):
        load_recipe(QUICK, ["distributed.fsdp.cpu_offload=true"])
    with pytest.raises(RecipeError, match="distributed.strategy"):
        load_recipe(QUICK, ["distributed.strategy=horovod"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--gpus", "0"], "--gpus 0: must be at least 1"),
        (["--set", "distributed.strategy=ddp", "--gpus", "0"], "--gpus 0: must be at least 1"),
        (["--set", "distributed.strategy=ddp"], "this machine has no GPU, so say how many processes"),
        (["--gpus", "2", "--num-machines", "2"], "give every machine --main-process-ip"),
        (
            ["--gpus", "2", "--num_machines", "2", "--machine_rank", "2", "--main_process_ip", "10.0.0.1"],
            "--machine-rank 2: must be 0 .. 1",
        ),
        (["--gpus", "2", "--main-process-port", "70000"], "must be 1 .. 65535"),
    ],
)
def test_bad_process_settings(capsys, args, expected):
    if torch.cuda.is_available() and "no GPU" in expected:
        pytest.skip("this machine has GPUs")
    assert expected in train_error(capsys, *args)


def test_speed_options_that_need_a_gpu_or_a_package(capsys):

    if not torch.cuda.is_available():
        err = train_error(capsys, "--set", "training.use_liger_kernel=true")
        assert "training.use_liger_kernel needs an NVIDIA GPU" in err
    for padding_free in (["training.padding_free=true"], ["data.packing=true", "training.padding_free=true"]):
        recipe = load_recipe(QUICK, padding_free)
        assert not [p for p in hardware_problems(recipe, recipe.training, cuda=False) if "padding_free" in p]
        # Eager attention computes a padding-free batch whole under its block mask: a note on GPUs.
        eager = load_recipe(QUICK, [*padding_free, "model.attn_implementation=eager"])
        assert any("eager attention" in n for n in hardware_notes(eager, eager.training, cuda=True))
        assert not hardware_notes(recipe, recipe.training, cuda=True)

    # What a GPU machine without the optional packages is told (this machine lacks them too).
    recipe = load_recipe(
        QUICK, ["distributed.strategy=deepspeed", "model.attn_implementation=flash_attention_2"]
    )
    problems = "\n".join(hardware_problems(recipe, {"use_liger_kernel": True}, cuda=True))
    assert "pip install 'qlora-stack[speed]'" in problems
    assert "needs the deepspeed package, which is not installed" in problems
    assert "needs the flash_attn package" in problems


# ---------------------------------------------------------------------------------------
# What each strategy hands to the Trainer and the model loader


def test_fsdp_and_zero3_store_4bit_weights_as_the_compute_dtype():

    fsdp = load_recipe(QUICK, ["distributed.strategy=fsdp"])
    zero3 = load_recipe(QUICK, ["distributed.strategy=deepspeed", "distributed.deepspeed.config=zero3"])
    zero2 = load_recipe(QUICK, ["distributed.strategy=deepspeed"])
    assert shards_weights(fsdp) and shards_weights(zero3) and not shards_weights(zero2)
    sharded = quantization_config(fsdp.quantization, torch.bfloat16, sharded=True)
    assert sharded.bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(fsdp.quantization, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def test_strategy_arguments_for_the_trainer():

    gpu = Device("cuda", "GPU", 1, True)
    fsdp = sft_kwargs(
        load_recipe(QUICK, ["distributed.strategy=fsdp", "distributed.fsdp.cpu_offload=true"]),
        gpu,
        "bfloat16",
    )
    assert fsdp["fsdp"] is True and fsdp["activation_checkpointing"] is False
    assert fsdp["fsdp_config"]["version"] == 2 and fsdp["fsdp_config"]["cpu_offload"] is True
    assert fsdp["fsdp_config"]["activation_checkpointing"] is True  # FSDP's own wrapper instead
    assert fsdp["optim"] == "adamw_torch"  # not the paged default: FSDP shards the states itself
    zero3 = sft_kwargs(
        load_recipe(QUICK, ["distributed.strategy=deepspeed", "distributed.deepspeed.config=zero3"]),
        gpu,
        "bfloat16",
    )
    config = json.loads(Path(zero3["deepspeed"]).read_text())
    assert config["zero_optimization"]["stage"] == 3 and config["train_micro_batch_size_per_gpu"] == "auto"
    ddp = sft_kwargs(load_recipe(QUICK, ["distributed.strategy=ddp"]), gpu, "bfloat16")
    assert ddp["ddp_find_unused_parameters"] is False


def test_shipped_deepspeed_configs_leave_batch_and_precision_to_the_trainer():
    for stage, name in ((2, "zero2"), (3, "zero3")):
        config = json.loads(Path(f"recipes/deepspeed/{name}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert config[key] == "auto"
        assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"


def test_multi_node_flags_reach_accelerate_launch():
    from accelerate.commands.launch import launch_command_parser

    topo = topology("ddp", visible_gpus=8, gpus=8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    cmd = accelerate_command(topo, ["train", "--recipe", QUICK])
    parsed = launch_command_parser().parse_args(cmd[3:])  # accelerate's own parser accepts it
    assert (parsed.num_processes, parsed.num_machines, parsed.machine_rank) == (16, 2, 1)
    assert (parsed.main_process_ip, parsed.main_process_port) == ("10.0.0.1", 29500)
    assert parsed.training_script == "training" and parsed.module


def test_old_gradient_checkpointing_names_are_not_silently_ignored():

    cpu = Device("cpu", "cpu", 1, False)
    recipe = load_recipe(
        QUICK,
        [
            "training.gradient_checkpointing=false",
            "training.gradient_checkpointing_kwargs={use_reentrant: true}",
        ],
    )
    args = build_sft_config(recipe, cpu, "float32")
    assert args.activation_checkpointing is False
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True}
    both = load_recipe(
        QUICK, ["training.gradient_checkpointing=false", "training.activation_checkpointing=true"]
    )
    with pytest.raises(RecipeError, match="keep only activation_checkpointing"):
        build_sft_config(both, cpu, "float32")
