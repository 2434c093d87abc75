"""python -m training push: publish the adapter or the merged model to the Hugging Face Hub (private)."""

from __future__ import annotations

import argparse
import sys

from training.cli.common import add_recipe_arguments
from training.recipe import load_recipe
from training.run_dir import ARTIFACTS, MERGED

# What this verb runs on (torch, transformers, TRL, ...) is imported inside its functions, after the
# arguments and the recipe are checked: training/cli/__init__.py says why.

# Exit code when the upload folder is complete but the Hub could not be reached.
HUB_UNREACHABLE = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--what", choices=ARTIFACTS, default=MERGED, help="default: merged")
    p.add_argument("--repo-id", help="user/name or org/name (default: <your user>/<run name>)")
    p.add_argument("--public", action="store_true", help="create a public repository (default: private)")
    p.add_argument(
        "--token-file", help="file holding the Hub token (default: $HF_TOKEN_PATH, then your login)"
    )


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from training.release.hub import HubUnreachable, push

    try:
        push(
            recipe.output.run_dir(),
            args.what,
            repo_id=args.repo_id,
            private=not args.public,
            token_file=args.token_file,
        )
    except HubUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return HUB_UNREACHABLE
    return 0
