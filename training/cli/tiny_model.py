"""python -m training tiny-model: build the tiny offline models (tiny://llama, tiny://gpt-neox, ...)."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.model.tiny import ARCHITECTURES, ensure_tiny_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=["all", *ARCHITECTURES], default="all")
    p.add_argument(
        "--out", type=Path, default=None, help="directory (default: $QLORA_TINY_DIR or outputs/tiny-models)"
    )
    p.add_argument("--data", type=Path, default=None, help="text to train the tokenizer on (default: data/)")


def run(args: argparse.Namespace) -> int:
    for arch in ARCHITECTURES if args.arch == "all" else [args.arch]:
        print(ensure_tiny_model(arch, out_dir=args.out, data_dir=args.data))
    return 0
