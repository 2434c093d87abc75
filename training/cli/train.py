"""python -m training train: fine-tune with QLoRA as the recipe says, on one or several processes."""

from __future__ import annotations

import argparse

from training.cli.common import add_recipe_arguments, at_least_one, ddp_for_several_processes
from training.recipe import Recipe, load_recipe
from training.train.launcher import DEFAULT_PORT, launch, topology

# What this verb runs on (torch, transformers, TRL, ...) is imported inside its functions, after the
# arguments and the recipe are checked: training/cli/__init__.py says why.


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--force", action="store_true", help="discard an earlier run of this recipe and start over"
    )
    p.add_argument(
        "--measure-memory",
        action="store_true",
        help="on the CPU, count live tensors for run.json's peak_memory_bytes, the figure `python -m training "
        "estimate` predicts (a Python call per operator: it slows small models severalfold; GPUs always report it)",
    )
    p.add_argument(
        "--profile",
        type=at_least_one("steps"),
        default=0,
        metavar="N",
        help="record N optimizer steps (from the second) with torch.profiler: a per-operator table and a "
        "timeline in outputs/<run>/profile/ (the steps recorded run slower; run.json names them)",
    )
    p.add_argument(
        "--allow-cpu",
        action="store_true",
        help="train on the CPU even when the recipe is predicted to be too slow or too large for it "
        "(without this, such a recipe is refused before anything is written)",
    )
    machines = p.add_argument_group(
        "several GPUs and machines (with distributed.strategy ddp, fsdp or deepspeed in the recipe)"
    )
    # accelerate's own spellings (--num_machines ...) work too, so commands copied from its docs run.
    machines.add_argument(
        "--gpus",
        "--num-processes",
        dest="gpus",
        type=int,
        metavar="N",
        help="processes on this machine, one per GPU (default: 1 with strategy none, every visible GPU "
        "otherwise; on a machine without GPUs, N CPU processes with the gloo backend). More than 1 with "
        "strategy none trains with ddp.",
    )
    machines.add_argument(
        "--num-machines",
        "--num_machines",
        type=int,
        default=1,
        metavar="M",
        help="machines in the run (default 1)",
    )
    machines.add_argument(
        "--machine-rank",
        "--machine_rank",
        type=int,
        default=0,
        metavar="R",
        help="this machine's number, 0 .. M-1 (default 0)",
    )
    machines.add_argument(
        "--main-process-ip",
        "--main_process_ip",
        metavar="ADDR",
        help="address of machine 0, reachable from all",
    )
    machines.add_argument(
        "--main-process-port",
        "--main_process_port",
        type=int,
        metavar="PORT",
        help=f"port on machine 0 (default: {DEFAULT_PORT} across machines, any free port on one machine)",
    )


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    import datasets

    from training.train.distributed import ranks, under_launcher

    if ranks().rank != 0:
        datasets.disable_progress_bars()  # rank 0 tells the story
    if under_launcher():  # one of the processes a launcher started (this stack's or the user's own)
        return _train_here(recipe, args)

    # Several processes asked for on the command line (make train GPUS=4): every process gets the
    # same override, and recipe.json records it.
    processes = (args.gpus or 1) * args.num_machines
    recipe, overrides = ddp_for_several_processes(recipe, args.recipe, list(args.overrides), processes)
    return _start(recipe, args, overrides)


def _start(recipe: Recipe, args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from training.train.preflight import preflight
    from training.train.sft_config import check_before_launch

    cuda = torch.cuda.device_count() > 0
    # Everything that can be refused without a model (strategy vs hardware, packages, configs) is
    # refused here, before any process starts.
    check_before_launch(recipe, args.recipe, cuda=cuda)
    # Before anything is written or downloaded: model and data reachable, the machine big enough.
    preflight(recipe, args.recipe, cuda=cuda, allow_cpu=args.allow_cpu)
    topo = topology(
        recipe.distributed.strategy,
        visible_gpus=torch.cuda.device_count(),
        gpus=args.gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        main_process_ip=args.main_process_ip,
        main_process_port=args.main_process_port,
    )
    if topo.world_size == 1:
        return _train_here(recipe, args)
    train_args = ["train", "--recipe", args.recipe, *(f"--set={o}" for o in overrides)]
    train_args += [
        *(["--force"] if args.force else []),
        *(["--measure-memory"] if args.measure_memory else []),
        *([f"--profile={args.profile}"] if args.profile else []),
    ]
    return launch(recipe, args.recipe, train_args, topo)


def _train_here(recipe: Recipe, args: argparse.Namespace) -> int:
    from training.train.run import run_training

    return run_training(
        recipe, args.recipe, force=args.force, measure_memory=args.measure_memory, profile_steps=args.profile
    )
