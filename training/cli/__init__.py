"""python -m training <command>: train, validate, estimate, merge, export, eval, push, check-serving, tiny-model.

One module per verb; each adds its arguments (`add_arguments`) and runs it (`run`). Only the
chosen verb's module is imported, and it imports torch, transformers, TRL and bitsandbytes only
once its arguments and the recipe's schema are checked: those imports take 6-12 s on 2 cores,
and a mistyped argument or recipe value is answered in 0.2 s without them (measured
2026-12-07; tests/training/test_cli.py keeps it so for the mistakes of train, validate, estimate,
merge, eval, push, export and tiny-model, and for every verb's --help). What a parser offers
(export's quantization types, the tiny architectures) comes from modules without those imports.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from training.errors import UserError

# verb -> (module, help)
VERBS = {
    "train": ("training.cli.train", "fine-tune with QLoRA as the recipe says (resumes an interrupted run)"),
    "validate": (
        "training.cli.validate",
        "check a recipe (schema, trainer settings, every row of local data) without loading a model",
    ),
    "estimate": (
        "training.cli.estimate",
        "predict peak GPU memory per device for a recipe (from the model config; nothing is loaded)",
    ),
    "merge": ("training.cli.merge", "fold the LoRA adapter into full weights (streaming, verified, atomic)"),
    "export": (
        "training.cli.export",
        "the merged model as GGUF for llama.cpp and Ollama (llama.cpp's converter, quantized, verified)",
    ),
    "eval": (
        "training.cli.evaluate",
        "perplexity, greedy answers and lm-eval scores of base, adapter, merged models and servers, side by side",
    ),
    "push": ("training.cli.push", "publish the adapter or merged model to the Hugging Face Hub (private)"),
    "check-serving": (
        "training.cli.check_serving",
        "report whether TGI can load and shard a model directory",
    ),
    "tiny-model": (
        "training.cli.tiny_model",
        "build the tiny offline models (tiny://llama, tiny://gpt-neox, ...)",
    ),
}


_FULL = "Free space there, or choose another output.dir (--set output.dir=DIR), and run the command again"
_DENIED = "Fix its permissions (or the read-only mount), or write elsewhere: --set output.dir=DIR"
# Errors of the storage, not of this program: the file and the reason, without a traceback.
STORAGE_ERRORS = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EFBIG: _FULL,
    errno.EACCES: _DENIED,
    errno.EPERM: _DENIED,
    errno.EROFS: _DENIED,
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """Every verb with its help; the arguments of `verb` (its module is imported for them)."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(verb).parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    # With several processes, rank 0 tells the story; the others speak only of errors.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s", stream=sys.stderr
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.run(args)
    except UserError as e:
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in STORAGE_ERRORS or e.filename is None:
            raise
        print(
            f"error{f' (rank {rank})' if rank else ''}: {e.filename}: {e.strerror}. {STORAGE_ERRORS[e.errno]}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
