"""python -m training estimate: predict peak GPU memory per device for a recipe, from the model's config."""

from __future__ import annotations

import argparse
import json

from training.cli.common import add_recipe_arguments, ddp_for_several_processes
from training.errors import UserError
from training.recipe import load_recipe

# What this verb runs on (torch, transformers, TRL, ...) is imported inside its functions, after the
# arguments and the recipe are checked: training/cli/__init__.py says why.


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs in the run (default 1)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--gpu-memory", metavar="SIZE", help="memory of one GPU, e.g. 80GiB, 24GB, 40960MiB")
    size.add_argument("--card", metavar="NAME", help="a known card, e.g. h100-80gb, a100-40gb, rtx4090-24gb")
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (default); cpu predicts this stack's CPU run (float32), as the tests measure it",
    )
    p.add_argument(
        "--config", metavar="CONFIG_JSON", help="the model's config.json (offline, instead of the hub)"
    )
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: must be at least 1")
    from training.train.estimate import (
        GiB,
        card_capacity,
        estimate,
        format_estimate,
        load_config,
        parse_capacity,
    )

    recipe, _ = ddp_for_several_processes(recipe, args.recipe, args.overrides, args.gpus)
    capacity = None
    if args.card:
        capacity = (args.card.lower(), card_capacity(args.card))
    elif args.gpu_memory:
        capacity = (args.gpu_memory, parse_capacity(args.gpu_memory))
    # A named GPU size also decides the activation checkpointing default, as a run on that GPU would.
    memory = int(capacity[1] * GiB) if capacity and args.device == "cuda" else None
    est = estimate(
        recipe, load_config(recipe, args.config), device=args.device, gpus=args.gpus, memory=memory
    )
    if args.json:
        print(json.dumps(est.as_dict(capacity), indent=2))
    else:
        print(format_estimate(est, capacity))
    return 0
