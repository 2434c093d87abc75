"""python -m training <command>: train, validate, merge, eval, push, check-serving, tiny-model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from training.errors import UserError

DEFAULT_RECIPE = "recipes/quickstart.yaml"


def _recipe_args(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune with QLoRA as the recipe says (resumes an interrupted run)")
    _recipe_args(p)
    p.add_argument(
        "--force", action="store_true", help="discard an earlier run of this recipe and start over"
    )

    p = sub.add_parser(
        "validate", help="check a recipe (schema and trainer settings) without loading anything"
    )
    _recipe_args(p)

    p = sub.add_parser("merge", help="fold the LoRA adapter into full weights (streaming, verified, atomic)")
    _recipe_args(p)
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
    p.add_argument("--max-shard-size", help="largest weight file, e.g. 2GB (default from the recipe)")
    p.add_argument(
        "--strategy", choices=["auto", "streaming", "peft"], help="default: streaming where possible"
    )
    p.add_argument("--no-verify", action="store_true", help="skip comparing logits with base + adapter")
    p.add_argument(
        "--num-shard", type=int, default=None, help="GPUs to check TGI sharding for (default: visible GPUs)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing merged directory")

    p = sub.add_parser(
        "eval", help="perplexity and greedy answers of base, adapter and merged models, side by side"
    )
    _recipe_args(p)
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

    p = sub.add_parser("push", help="publish the adapter or merged model to the Hugging Face Hub (private)")
    _recipe_args(p)
    p.add_argument("--what", choices=["adapter", "merged"], default="merged", help="default: merged")
    p.add_argument("--repo-id", help="user/name or org/name (default: <your user>/<run name>)")
    p.add_argument("--public", action="store_true", help="create a public repository (default: private)")
    p.add_argument(
        "--token-file", help="file holding the Hub token (default: $HF_TOKEN_PATH, then your login)"
    )

    p = sub.add_parser("check-serving", help="report whether TGI can load and shard a model directory")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--num-shard", type=int, default=1)

    p = sub.add_parser(
        "tiny-model", help="build the tiny offline models (tiny://llama, tiny://gpt-neox, ...)"
    )
    p.add_argument("--arch", choices=["all", "llama", "llama-tied", "gpt-neox"], default="all")
    p.add_argument(
        "--out", type=Path, default=None, help="directory (default: $QLORA_TINY_DIR or outputs/tiny-models)"
    )
    p.add_argument("--data", type=Path, default=None, help="text to train the tokenizer on (default: data/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "tiny-model":
        from training.tiny_models import ARCHITECTURES, ensure_tiny_model

        for arch in ARCHITECTURES if args.arch == "all" else [args.arch]:
            print(ensure_tiny_model(arch, out_dir=args.out, data_dir=args.data))
        return 0

    if args.command == "check-serving":
        from training.serving_check import check_serving

        report = check_serving(args.model_dir, args.num_shard)
        print(report.format())
        return 0 if report.ok else 1
    if args.command == "merge":
        return _merge(args)

    from training.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "validate":
        from training.model import compute_dtype, detect_device
        from training.sft_args import build_sft_config

        device = detect_device()
        dtype = str(compute_dtype(recipe.model.dtype, device)).removeprefix("torch.")
        build_sft_config(recipe, device, dtype, args.recipe)
        print(f"{args.recipe}: ok (run '{recipe.output.run_name}' -> {recipe.output.run_dir()})")
        return 0
    if args.command == "eval":
        from training.evaluate import evaluate, write_report

        run_dir = recipe.output.run_dir()
        models = args.models or ["base", "adapter"] + (["merged"] if (run_dir / "merged").is_dir() else [])
        report = evaluate(recipe, models, file=args.file, prompts=args.prompts)
        print(write_report(report, run_dir / "eval.json", run_dir / "eval.png"))
        return 0
    if args.command == "push":
        from training.publish import HubUnreachable, push

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
            return 3
        return 0
    if args.command == "train":
        from training.trainer import run_training

        return run_training(recipe, args.recipe, force=args.force)
    raise AssertionError(args.command)


def _merge(args: argparse.Namespace) -> int:
    import torch

    from training.adapters import read_adapter
    from training.merge import MergeSettings, merge_adapter
    from training.recipe import MergeSection, load_recipe

    if args.adapter is None:
        recipe = load_recipe(args.recipe, args.overrides)
        adapter_dir = recipe.output.run_dir() / "adapter"
        section = recipe.merge
    else:
        adapter_dir = args.adapter
        section = MergeSection(**read_adapter(adapter_dir).run.get("recipe", {}).get("merge", {}))
    out_dir = args.out or adapter_dir.parent / "merged"
    settings = MergeSettings(
        base=args.base or section.base,
        dtype=args.dtype or section.dtype,
        max_shard_size=args.max_shard_size or section.max_shard_size,
        verify=section.verify and not args.no_verify,
        strategy=args.strategy or section.strategy,
        num_shard=args.num_shard or max(torch.cuda.device_count(), 1),
    )
    merge_adapter(adapter_dir, out_dir, settings, force=args.force)
    return 0
