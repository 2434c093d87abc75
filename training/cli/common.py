"""What several verbs share: the recipe arguments, and the strategy several processes get."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from training.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

DEFAULT_RECIPE = "recipes/quickstart.yaml"


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe", "-r", default=DEFAULT_RECIPE, help=f"YAML recipe (default: {DEFAULT_RECIPE})"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe key, e.g. --set training.max_steps=10 (repeatable)",
    )


def at_least_one(what: str) -> Callable[[str], int]:
    """An argparse type: a whole number of `what`, 1 or more (a usage error names it otherwise)."""

    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of {what}: give a whole number, 1 or more"
            )
        return int(text)

    return parse


def ddp_for_several_processes(recipe: Recipe, source: str, overrides: list[str], processes: int):
    """(recipe, overrides) with distributed.strategy ddp where the recipe says none but several
    processes were asked for (--gpus 4): the strategy that needs no other setting. train and
    estimate decide alike, so the estimate is for the run that would start."""
    if recipe.distributed.strategy != "none" or processes <= 1:
        return recipe, overrides
    log.info("distributed.strategy is none and %d processes were asked for: using ddp", processes)
    overrides = [*overrides, "distributed.strategy=ddp"]
    return load_recipe(source, overrides), overrides
