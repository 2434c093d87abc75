"""python -m training tiny-model: build the tiny offline models (tiny://llama, tiny://gpt-neox, ...)."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.model.tiny_names import ARCHITECTURES, SCHEME

# The builder (torch, transformers, TRL) is imported inside run, after the arguments are checked:
# training/cli/__init__.py says why.


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        choices=["all", *ARCHITECTURES],
        default="all",
        help=f"the model to build, {SCHEME}ARCH in a recipe (default: all)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="directory (default: $QLORA_TINY_DIR or outputs/tiny-models)"
    )
    p.add_argument("--data", type=Path, default=None, help="text to train the tokenizer on (default: data/)")


def run(args: argparse.Namespace) -> int:
    from training.model.tiny import ensure_tiny_model

    for arch in ARCHITECTURES if args.arch == "all" else [args.arch]:
        print(ensure_tiny_model(arch, out_dir=args.out, data_dir=args.data))
    return 0
