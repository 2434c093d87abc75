"""Merge strategies: where the merged model's tensors come from, one at a time.

Each strategy is a `MergedTensors` source that `training.merge.weights.write_weights` reads
tensor by tensor into bounded safetensors shards:
- streaming: base tensors with the LoRA (or DoRA) delta folded in as each is read; holds one
  tensor at a time (the default);
- peft: peft's own merge_and_unload on the whole model in memory (the fallback for adapters
  the streaming path does not fold).
A new strategy is one module here with a `open_merged` function, and one entry in STRATEGIES.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from training.merge.adapters import Adapter
from training.merge.nf4 import RoundTrip
from training.merge.strategies import peft_merge, streaming
from training.merge.weights import Spec


class MergedTensors(Protocol):
    def specs(self) -> list[Spec]:
        """Every tensor of the merged model: (name, shape, dtype), in checkpoint order."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """One merged tensor, in its output dtype; valid until the next call (the streaming
        strategy reuses its memory)."""
        ...


# open_merged(base_dir, adapter, dtype, *, tied, round_trip) -> MergedTensors
Opener = Callable[..., MergedTensors]
STRATEGIES: dict[str, Opener] = {
    "streaming": streaming.open_merged,
    "peft": peft_merge.open_merged,
}


def open_merged(
    strategy: str,
    base_dir: Path,
    adapter: Adapter,
    dtype: torch.dtype,
    *,
    tied: bool,
    round_trip: RoundTrip | None,
) -> MergedTensors:
    return STRATEGIES[strategy](base_dir, adapter, dtype, tied=tied, round_trip=round_trip)
