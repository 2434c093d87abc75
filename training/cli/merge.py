"""python -m training merge: fold the LoRA adapter into full weights (streaming, verified, atomic)."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.cli.common import add_recipe_arguments, at_least_one
from training.merge.adapters import read_adapter
from training.recipe import MergeSection, load_recipe, shard_size_bytes
from training.run_dir import MERGED, RunDir

# What this verb runs on (torch, transformers, TRL, ...) is imported inside its functions, after the
# arguments and the recipe are checked: training/cli/__init__.py says why.


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--adapter", type=Path, help="adapter directory (default: outputs/<run>/adapter of the recipe)"
    )
    p.add_argument("--out", type=Path, help="merged model directory (default: merged/ beside the adapter)")
    p.add_argument(
        "--base",
        choices=["original", "nf4-roundtrip", "auto"],
        help="weights to fold into: the original ones, their NF4 round trip as seen in training, or the one "
        "with the lower validation perplexity (default from the recipe: original)",
    )
    p.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="default: the base model's"
    )
    p.add_argument(
        "--max-shard-size",
        type=_shard_size,
        help="largest weight file, e.g. 2GB, 500MB or 4GiB (default from the recipe)",
    )
    p.add_argument(
        "--strategy", choices=["auto", "streaming", "peft"], help="default: streaming where possible"
    )
    p.add_argument(
        "--verify",
        choices=["streamed", "full", "off"],
        help="compare the merged model's logits with base + adapter: one decoder layer in memory at a "
        "time (streamed), both models loaded whole, with greedy generation (full), or not at all "
        "(default from the recipe: streamed)",
    )
    p.add_argument("--no-verify", action="store_true", help="the same as --verify off")
    p.add_argument(
        "--num-shard",
        type=at_least_one("GPUs"),
        default=None,
        help="GPUs to check TGI sharding for (default: visible GPUs)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing merged directory")


def run(args: argparse.Namespace) -> int:
    if args.adapter is None:
        recipe = load_recipe(args.recipe, args.overrides)
        adapter_dir = RunDir(recipe.output.run_dir()).adapter
        section = recipe.merge
    else:
        adapter_dir = args.adapter
        section = MergeSection(**read_adapter(adapter_dir).run.get("recipe", {}).get("merge", {}))
    out_dir = args.out or adapter_dir.parent / MERGED
    import torch

    from training.merge.coordinator import MergeSettings, merge_adapter

    settings = MergeSettings(
        base=args.base or section.base,
        dtype=args.dtype or section.dtype,
        max_shard_size=args.max_shard_size or section.max_shard_size,
        verify="off" if args.no_verify else args.verify or section.verify,
        strategy=args.strategy or section.strategy,
        num_shard=args.num_shard or max(torch.cuda.device_count(), 1),
    )
    merge_adapter(adapter_dir, out_dir, settings, force=args.force)
    return 0


# --max-shard-size, checked before the base model loads: huggingface_hub's parser raised a traceback
# only when the weights were written.
def _shard_size(text: str) -> str:
    try:
        shard_size_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return text
