"""python -m training validate: check a recipe (schema and trainer settings) without loading anything."""

from __future__ import annotations

import argparse

from training.cli.common import add_recipe_arguments
from training.model.loading import compute_dtype, detect_device
from training.recipe import load_recipe
from training.train.sft_config import build_sft_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    device = detect_device()
    dtype = str(compute_dtype(recipe.model.dtype, device)).removeprefix("torch.")
    build_sft_config(recipe, device, dtype, args.recipe)
    print(f"{args.recipe}: ok (run '{recipe.output.run_name}' -> {recipe.output.run_dir()})")
    return 0
