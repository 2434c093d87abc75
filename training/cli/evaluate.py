"""python -m training eval: perplexity and greedy answers of base, adapter and merged models, side by side."""

from __future__ import annotations

import argparse

from training.cli.common import add_recipe_arguments
from training.recipe import load_recipe
from training.release.evaluate import evaluate, write_report
from training.run_dir import RunDir


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME|DIR",
        help="base, adapter (as trained, quantized), merged, or a merged model directory; repeatable "
        "(default: base, adapter and merged when present)",
    )
    p.add_argument(
        "--file", help="evaluate on this file (in the recipe's format) instead of the validation split"
    )
    p.add_argument("--prompts", type=int, default=8, help="validation prompts to answer greedily (default 8)")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = RunDir(recipe.output.run_dir())
    models = args.models or ["base", "adapter"] + (["merged"] if run_dir.merged.is_dir() else [])
    report = evaluate(recipe, models, file=args.file, prompts=args.prompts)
    print(write_report(report, run_dir.eval_json, run_dir.eval_png))
    return 0
