"""Padded positions per epoch: random batches against length-grouped ones, on a recipe's own rows.

Every padded position costs a GPU (or CPU) as much as a data token, so the share of padding
in the batches bounds what an unpacked run can reach. This counts it without training: the
recipe's training rows as the stack tokenizes them (truncated to data.max_length), ordered
by transformers' RandomSampler and by its LengthGroupedSampler (what
`train_sampling_strategy: random` and `group_by_length` use; the Trainer groups by the
rows of an optimizer step, batch x gradient accumulation), cut into batches of the recipe's
size, each padded to its longest row, as TRL's collator pads.

    python bench/padding.py                                   # the quickstart recipe
    python bench/padding.py --recipe bench/recipes/gpu-7b-varlen.yaml --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def padded_positions(lengths: list[int], order: list[int], batch: int) -> int:
    """Positions in the padded batches of one epoch (the last, partial batch included)."""
    return sum(
        len(chunk) * max(lengths[i] for i in chunk)
        for chunk in (order[start : start + batch] for start in range(0, len(order), batch))
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="epochs to average, one shuffle each")
    args = parser.parse_args()

    import torch
    from torch.utils.data import RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from training.data.prepare import prepare_data
    from training.model.loading import load_tokenizer
    from training.recipe import load_recipe

    recipe = load_recipe(args.recipe, ["data.validation=null"])
    batch = int(recipe.training.get("per_device_train_batch_size", 8))
    step = batch * int(recipe.training.get("gradient_accumulation_steps", 1))
    rows = prepare_data(recipe.data, load_tokenizer(recipe.model)).train
    lengths = [min(len(ids), recipe.data.max_length) for ids in rows["input_ids"]]
    tokens = sum(lengths)
    shares = {"random": [], "group_by_length": []}
    for seed in range(args.seeds):
        samplers = {
            "random": RandomSampler(lengths, generator=torch.Generator().manual_seed(seed)),
            "group_by_length": LengthGroupedSampler(
                step, lengths=lengths, generator=torch.Generator().manual_seed(seed)
            ),
        }
        for name, sampler in samplers.items():
            shares[name].append(tokens / padded_positions(lengths, list(sampler), batch))
    print(
        f"{args.recipe}: {len(lengths)} rows, {tokens:,} tokens, batch {batch}, "
        f"max_length {recipe.data.max_length}, {args.seeds} epochs"
    )
    for name, values in shares.items():
        share = statistics.mean(values)
        print(f"  {name:<16} data tokens are {share:6.1%} of the padded positions")
    ratio = statistics.mean(shares["random"]) / statistics.mean(shares["group_by_length"])
    print(f"  group_by_length pads to {ratio:.2f}x the positions of random batches")


if __name__ == "__main__":
    main()
