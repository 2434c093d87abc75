"""The fallback merge: peft's own merge_and_unload on the whole model in memory.

Used when the adapter holds what the streaming path does not fold (fully trained modules,
trainable token embeddings, per-module ranks, ...). Needs memory for the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from training.merge.adapters import Adapter
from training.merge.nf4 import RoundTrip
from training.merge.weights import Spec


class PeftMerge:
    """A tensor source for `write_weights`, from peft's merged model."""

    def __init__(
        self, base_dir: Path, adapter: Adapter, dtype: torch.dtype, round_trip: RoundTrip | None = None
    ):

        base = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=dtype, trust_remote_code=adapter.trust_remote_code
        )
        if round_trip is not None:
            for name, module in base.named_modules():
                if name in round_trip.modules:
                    module.weight.data = round_trip(module.weight.data).to(dtype)
        merged = PeftModel.from_pretrained(base, adapter.path).merge_and_unload()
        # transformers 5 renames some weights when loading (GPT-NeoX's embed_out becomes
        # lm_head); reverting gives the checkpoint's own names, which every server reads.
        # state_dict() names both halves of a tied embedding, so the output head is written
        # explicitly, as in the streaming path.
        state = revert_weight_conversion(merged, merged.state_dict())
        self.state = {name: t.detach() for name, t in state.items()}
        self.dtype = dtype

    def specs(self) -> list[Spec]:
        return [(n, tuple(t.shape), self._out_dtype(t.dtype)) for n, t in self.state.items()]

    def get(self, name: str) -> torch.Tensor:
        tensor = self.state[name]
        return tensor.to(self._out_dtype(tensor.dtype))

    def _out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if dtype.is_floating_point else dtype


def open_merged(
    base_dir: Path, adapter: Adapter, dtype: torch.dtype, *, tied: bool, round_trip: RoundTrip | None
) -> PeftMerge:
    # peft writes the output head of a tied model itself (state_dict names both halves).
    return PeftMerge(base_dir, adapter, dtype, round_trip)
