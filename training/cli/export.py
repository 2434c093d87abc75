"""python -m training export: the merged model as GGUF for llama.cpp and Ollama (converted, quantized, verified)."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.cli.common import add_recipe_arguments
from training.errors import UserError
from training.merge.gguf_quants import DEFAULT_QUANT, QUANTS, parse_quants
from training.recipe import load_recipe
from training.run_dir import RunDir

FORMATS = ("gguf",)

# The export (transformers, torch for the verification, llama.cpp) is imported inside run, after the
# arguments and the recipe are checked: training/cli/__init__.py says why.


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--format", default="gguf", help=f"export format: {', '.join(FORMATS)} (default gguf)")
    p.add_argument(
        "--quant",
        action="append",
        default=[],
        metavar="TYPE",
        help=f"quantization type, repeatable or comma-separated: {', '.join(QUANTS)} (default {DEFAULT_QUANT})",
    )
    p.add_argument(
        "--merged",
        type=Path,
        help="merged model directory (default: outputs/<run>/merged of the recipe); the GGUF goes to gguf/ beside "
        "it, named after the run (outputs/<run>/merged) or else after the directory",
    )
    p.add_argument("--no-verify", action="store_true", help="skip comparing the GGUF with the merged model")
    p.add_argument("--threads", type=int, default=None, help="quantizer threads (default: every core)")
    p.add_argument("--force", action="store_true", help="replace existing GGUF files of these types")


def run(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise UserError(f"--format {args.format}: the export formats are {', '.join(FORMATS)}")
    quants = parse_quants(args.quant or [DEFAULT_QUANT])
    if args.merged is None:
        run_dir = RunDir(load_recipe(args.recipe, args.overrides).output.run_dir())
    else:
        run_dir = RunDir.of_merged(args.merged)
    from training.merge.export_gguf import ExportSettings, export_gguf

    settings = ExportSettings(
        quants=quants, verify=not args.no_verify, force=args.force, threads=args.threads
    )
    export_gguf(run_dir.merged, run_dir, settings)
    return 0
