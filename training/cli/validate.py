"""python -m training validate: check a recipe (schema, trainer settings, local model and data files,
and every row of local data) without loading a model or asking the Hub."""

from __future__ import annotations

import argparse

from training.cli.common import add_recipe_arguments
from training.data.templates import resolve_template
from training.errors import RecipeError
from training.recipe import DataSection, load_recipe

# What this verb runs on (torch, transformers, TRL, ...) is imported inside its functions, after the
# arguments and the recipe are checked: training/cli/__init__.py says why.


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from training.model.loading import compute_dtype, detect_device
    from training.train.preflight import data_problems, model_problems
    from training.train.sft_config import build_sft_config

    device = detect_device()
    dtype = str(compute_dtype(recipe.model.dtype, device)).removeprefix("torch.")
    build_sft_config(recipe, device, dtype, args.recipe)
    problems = model_problems(recipe, hub=False) + data_problems(recipe, hub=False)
    if problems:
        raise RecipeError(f"{args.recipe}: " + "\n  ".join(problems))
    print(f"data: {check_rows(recipe.data)}")
    print(f"{args.recipe}: ok (run '{recipe.output.run_name}' -> {recipe.output.run_dir()})")
    return 0


def check_rows(data: DataSection) -> str:
    """Every row of local data checked as `train` checks it (a bad row is an error naming it, unless
    data.on_bad_row skips it); what was found. Rows of a Hub dataset are checked when `train` reads them."""
    from training.data.prepare import read_examples
    from training.data.sources import is_local

    if not is_local(data.source):
        return f"{data.source} is a Hub dataset: its rows are checked when train reads them"
    template = resolve_template(data.template) if data.template else None
    rows = read_examples(data, template)
    found = f"{data.source}: {len(rows.train)} training rows"
    if rows.eval is not None:
        found += f", {len(rows.eval)} validation rows"
    skipped = rows.train_report.rows_skipped_bad + (
        rows.eval_report.rows_skipped_bad if rows.eval_report else 0
    )
    with_tools = rows.train_report.rows_with_tools + (
        rows.eval_report.rows_with_tools if rows.eval_report else 0
    )
    # The template that must render them comes with the tokenizer, which validate does not load.
    if with_tools:
        found += f" ({with_tools} with tools or tool calls: train checks that the model's chat template renders them)"
    if skipped:
        sample = (rows.train_report.bad_rows or rows.eval_report.bad_rows)[0]
        return f"{found}; {skipped} bad rows skipped (data.on_bad_row: skip), e.g. {sample}"
    return f"{found}, all well-formed (their token lengths are counted when train tokenizes them)"
