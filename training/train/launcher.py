"""Start a run on several processes through `accelerate launch` (torchrun underneath), and supervise it.

`python -m training train` with distributed.strategy ddp, fsdp or deepspeed, when no launcher
started it, starts itself again as `accelerate launch ... -m training train ...`: one process per
GPU on this machine, the machines meeting at the main process's address. This process stays as
a supervisor. It passes SIGTERM and Ctrl-C on to the launcher once; the launcher passes them to
every training process, which agree on a step, save a checkpoint and stop. The launcher runs in
a session of its own, so a Ctrl-C in the terminal reaches it once (through here), not twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500
USER_ERROR = 2  # what `python -m training` exits with after printing a UserError (training.cli)
# How long torchrun waits for the processes to save their checkpoint after passing a signal on,
# before it kills them. Its own default (30 s) can be shorter than one step plus a save.
SHUTDOWN_TIMEOUT_S = 600


class LauncherError(UserError):
    pass


@dataclass(frozen=True)
class Topology:
    processes_per_machine: int
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.processes_per_machine * self.num_machines

    def describe(self) -> str:
        where = f"{self.processes_per_machine} per machine"
        if self.num_machines > 1:
            where += (
                f" x {self.num_machines} machines (this is machine {self.machine_rank}; "
                f"machine 0 at {self.main_process_ip}:{self.main_process_port})"
            )
        return f"{self.world_size} processes, {where}"


def topology(
    strategy: str,
    *,
    visible_gpus: int,
    gpus: int | None = None,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
) -> Topology:
    """Check the command line's machine settings against the strategy and this machine."""
    if strategy == "none":
        # The caller turns strategy none with several processes into ddp (see cli._train).
        if (gpus or 1) > 1 or num_machines > 1:
            raise LauncherError(
                f"--gpus {gpus or 1} --num-machines {num_machines}: distributed.strategy is none (one process). "
                "To train on several GPUs, choose a strategy, e.g. --set distributed.strategy=ddp "
                "(a copy of the 4-bit model per GPU) or fsdp (sharded, for models that do not fit one GPU)."
            )
        if gpus is not None and gpus < 1:
            raise LauncherError(f"--gpus {gpus}: must be at least 1")
        return Topology(1)
    if gpus is None:
        if visible_gpus == 0:
            raise LauncherError(
                f"distributed.strategy {strategy}: this machine has no GPU, so say how many processes to "
                "start: --gpus N (make train GPUS=N) runs N CPU processes with the gloo backend."
            )
        gpus = visible_gpus
    if gpus < 1:
        raise LauncherError(f"--gpus {gpus}: must be at least 1")
    if visible_gpus and gpus > visible_gpus:
        raise LauncherError(
            f"--gpus {gpus}: this machine has {visible_gpus} GPU(s) visible (CUDA_VISIBLE_DEVICES)"
        )
    if num_machines < 1:
        raise LauncherError(f"--num-machines {num_machines}: must be at least 1")
    if not 0 <= machine_rank < num_machines:
        raise LauncherError(
            f"--machine-rank {machine_rank}: must be 0 .. {num_machines - 1} with --num-machines {num_machines} "
            "(0 on the machine whose address the others use)"
        )
    if num_machines > 1 and not main_process_ip:
        raise LauncherError(
            f"--num-machines {num_machines}: give every machine --main-process-ip, the address of machine 0 "
            "(reachable from all machines), and the same --main-process-port"
        )
    if main_process_port is not None and not 1 <= main_process_port <= 65535:
        raise LauncherError(f"--main-process-port {main_process_port}: must be 1 .. 65535")
    if gpus * num_machines < 2 and strategy == "ddp":
        return Topology(1)  # DDP over one process is plain training: no launcher needed
    if gpus * num_machines < 2:
        raise LauncherError(
            f"distributed.strategy {strategy} with {gpus * num_machines} process in all: it shards over "
            "at least 2 (--gpus N, make train GPUS=N). On one GPU use strategy none; `python -m training "
            "estimate` tells whether the model fits."
        )
    if num_machines > 1 and main_process_port is None:
        main_process_port = DEFAULT_PORT
    return Topology(gpus, num_machines, machine_rank, main_process_ip, main_process_port)


def accelerate_command(topo: Topology, train_args: list[str]) -> list[str]:
    """`accelerate launch` for this topology, running `python -m training <train_args>` in every process."""
    cmd = [
        sys.executable,
        "-m",
        "training.train.launcher",  # accelerate launch, quiet about the signal it passed on (see main below)
        # Plain torchrun processes: the strategy (DDP, FSDP, DeepSpeed) reaches the Trainer through
        # its arguments, built from the recipe in every process.
        "--multi_gpu",
        "--num_processes",
        str(topo.world_size),
        "--num_machines",
        str(topo.num_machines),
        "--machine_rank",
        str(topo.machine_rank),
        # One machine: any free port, so two runs on one host do not collide.
        "--main_process_port",
        str(topo.main_process_port if topo.main_process_port is not None else 0),
        # The recipe sets precision (model.dtype) and compilation (training.torch_compile).
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if topo.main_process_ip:
        cmd += ["--main_process_ip", topo.main_process_ip]
    return [*cmd, "-m", "training", *train_args]


def launch_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    return env


def supervise(cmd: list[str], env: dict[str, str], run_json: Path) -> int:
    """Run the launcher, pass signals on, and turn its exit into the run's exit code."""
    launched_at = time.time()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_stop_with_parent)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        return 0
    stopped = _interrupted_signal(run_json, since=launched_at)
    if stopped is not None:
        # Saved and stopped as asked, maybe on another machine's signal: the launcher calls that a failure.
        return 128 + stopped
    if received:
        return 128 + received[0]
    return code


def _interrupted_signal(run_json: Path, since: float) -> int | None:
    try:
        if run_json.stat().st_mtime < since:
            return None
        record = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("signal") if record.get("status") == "interrupted" else None


def _stop_with_parent() -> None:
    """In the launcher: get SIGTERM (save and stop) if this supervisor dies without passing a signal on."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):  # Linux only; elsewhere the launcher just outlives us
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def main(argv: list[str]) -> int:
    """`accelerate launch ARGS`, but a SIGTERM or Ctrl-C it passed on ends it with 128+signal.

    torchrun's agent, on a signal, passes it to the processes, waits for them (they save a
    checkpoint) and then raises an exception that would end `accelerate launch` with a
    traceback and status 1, as if the run had crashed.
    """
    # Imported here, in the launcher process only: `train` imports this module for its arguments.
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        # Each process printed its own error; torchrun's report of them would add a traceback of
        # its own and end with status 1, whatever the processes said.
        rank, failure = e.get_first_failure()
        if failure.exitcode == USER_ERROR:  # a one-line error, already printed by that process
            return USER_ERROR
        print(
            f"error: the process of rank {rank} stopped with status {failure.exitcode} (its error is above)",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def launch(recipe, source: str, train_args: list[str], topo: Topology) -> int:
    """Start a checked recipe (sft_args.check_before_launch) on every process of this machine."""

    cmd = accelerate_command(topo, train_args)
    log.info(
        "Launching '%s' with strategy %s on %s:\n  accelerate launch %s",
        recipe.output.run_name,
        recipe.distributed.strategy,
        topo.describe(),
        shlex.join(cmd[3:]),
    )
    return supervise(cmd, launch_environment(), recipe.output.run_dir() / "run.json")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
