"""python -m training check-serving: will TGI load this model directory, sharded over N GPUs?"""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.backends.tgi_checks import check_serving


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path)
    p.add_argument("--num-shard", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    report = check_serving(args.model_dir, args.num_shard)
    print(report.format())
    return 0 if report.ok else 1
