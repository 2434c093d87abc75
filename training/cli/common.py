"""What several verbs share: the recipe arguments."""

from __future__ import annotations

import argparse

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
