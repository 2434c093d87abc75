"""python -m training validate: check a recipe (schema, trainer settings, local model and data files)
without loading anything or asking the Hub."""

from __future__ import annotations

import argparse

from training.cli.common import add_recipe_arguments
from training.errors import RecipeError
from training.model.loading import compute_dtype, detect_device
from training.recipe import load_recipe
from training.train.preflight import data_problems, model_problems
from training.train.sft_config import build_sft_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    device = detect_device()
    dtype = str(compute_dtype(recipe.model.dtype, device)).removeprefix("torch.")
    build_sft_config(recipe, device, dtype, args.recipe)
    problems = model_problems(recipe, hub=False) + data_problems(recipe, hub=False)
    if problems:
        raise RecipeError(f"{args.recipe}: " + "\n  ".join(problems))
    print(f"{args.recipe}: ok (run '{recipe.output.run_name}' -> {recipe.output.run_dir()})")
    return 0
