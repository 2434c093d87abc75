"""python -m training eval: perplexity, greedy answers and lm-eval scores of the model variants, side by side."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from training.cli.common import add_recipe_arguments
from training.errors import UserError
from training.recipe import load_recipe
from training.run_dir import RunDir
from training.run_lock import one_command_at_a_time

# What this verb runs on (torch, transformers, TRL, ...) is imported inside its functions, after the
# arguments and the recipe are checked: training/cli/__init__.py says why.


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME|DIR|URL",
        help="base, adapter (as trained, quantized), merged, a merged model directory, or the URL of a running "
        "OpenAI-compatible server (lm-eval scores only; API_KEY is sent); repeatable "
        "(default: base, adapter and merged when present)",
    )
    p.add_argument(
        "--file", help="evaluate on this file (in the recipe's format) instead of the validation split"
    )
    p.add_argument("--prompts", type=int, default=8, help="validation prompts to answer greedily (default 8)")
    p.add_argument(
        "--tasks",
        action="append",
        metavar="T1,T2",
        help="lm-evaluation-harness tasks, groups or patterns (kobest, kobest_*, qlora_stack_mc), comma-separated "
        "or repeated; default: the recipe's eval.tasks; 'none' runs none",
    )
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory of your own lm-eval task YAML files (repeatable)",
    )
    p.add_argument(
        "--limit", type=float, help="lm-eval: score only this many documents per task (default: the recipe's)"
    )
    p.add_argument(
        "--batch-size",
        default="1",
        help="lm-eval batch size for the local models: a number or 'auto' (default 1)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="lm-eval: requests in flight at once to a server (default 1)",
    )


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    batch_size = _batch_size(args.batch_size)
    from training.release.evaluate import HarnessSettings, evaluate, write_report

    run_dir = RunDir(recipe.output.run_dir())
    models = args.models or ["base", "adapter"] + (["merged"] if run_dir.merged.is_dir() else [])
    harness = HarnessSettings(
        tasks=_task_list(args.tasks, recipe.eval.tasks),
        include_paths=args.include_path,
        limit=args.limit if args.limit is not None else recipe.eval.limit,
        batch_size=batch_size,
        concurrency=args.concurrency,
        api_key=os.environ.get("API_KEY") or None,
    )
    # Held while the models load: a train --force or a merge --force of the run would replace them.
    with one_command_at_a_time(run_dir, "eval", reads=_runs_read(models, recipe.model.name)):
        report = evaluate(recipe, models, file=args.file, prompts=args.prompts, harness=harness)
        print(write_report(report, run_dir.eval_json, run_dir.eval_png))
    return 0


def _runs_read(models: list[str], base_model: str) -> list[RunDir]:
    """The other runs whose merged models this eval loads: those of the models given as directories
    (another run's merged/), and the base model's when it is one (the base and adapter variants
    load it). A merge --force into one, or a train --force of its run, would replace it while it loads."""
    from training.release.evaluate import VARIANTS, is_server

    dirs = [Path(m) for m in models if m not in VARIANTS and not is_server(m)]
    runs = [RunDir.of_merged(d) for d in dirs if d.is_dir()]
    base_run = RunDir.of_base_model(base_model) if {"base", "adapter"} & set(models) else None
    return runs + ([base_run] if base_run is not None else [])


def _task_list(given: list[str] | None, default: list[str]) -> list[str]:
    if given is None:
        return list(default)
    names = [n.strip() for item in given for n in item.split(",") if n.strip()]
    return [] if names == ["none"] else names


def _batch_size(value: str) -> int | str:
    if value == "auto" or (value.isdigit() and int(value) > 0):
        return value if value == "auto" else int(value)
    raise UserError(f"--batch-size {value!r}: a whole number >= 1, or auto")
