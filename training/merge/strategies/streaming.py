"""Fold LoRA deltas into base weights tensor by tensor, never holding the whole model.

The base weight W is the checkpoint's, or (merge.base: nf4-roundtrip) its NF4 round trip,
the weight the 4-bit layer computed with during training.

For every adapted linear layer, in float32:
    LoRA:  W' = W + s * B @ A             s = alpha / r  (rsLoRA: alpha / sqrt(r))
    DoRA:  W' = m / ||W + s * B @ A||_row * (W + s * B @ A)
where ||.||_row is the L2 norm over the input dimension of each output row and m the
trained magnitude vector. Biases trained with the adapter replace the base biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.merge.adapters import Adapter
from training.merge.nf4 import RoundTrip
from training.merge.weights import Checkpoint, Spec

_PREFIX = "base_model.model."


class StreamingUnsupported(Exception):
    """The adapter holds something the streaming path does not fold; peft's merge must be used."""


@dataclass
class LoraModule:
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None


@dataclass
class AdapterWeights:
    modules: dict[str, LoraModule] = field(default_factory=dict)  # base module path -> LoRA factors
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name -> trained bias


def read_adapter_weights(adapter: Adapter) -> AdapterWeights:
    weights = AdapterWeights()
    for key, tensor in load_file(adapter.path / "adapter_model.safetensors").items():
        name = key.removeprefix(_PREFIX)
        for suffix, attr in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_magnitude_vector", "magnitude"),
        ):
            if name.endswith(suffix):
                module = weights.modules.setdefault(name.removesuffix(suffix), LoraModule())
                setattr(module, attr, tensor)
                break
        else:
            if name.endswith(".base_layer.bias"):
                weights.biases[name.replace(".base_layer.bias", ".bias")] = tensor
            else:
                raise StreamingUnsupported(f"adapter tensor {key}")
    for path, module in weights.modules.items():
        if module.A is None or module.B is None:
            raise StreamingUnsupported(f"{path} has only one of lora_A/lora_B")
        if adapter.uses_dora and module.magnitude is None:
            raise StreamingUnsupported(f"{path} lacks its DoRA magnitude vector")
    return weights


def fold_into(w: torch.Tensor, lora: LoraModule, scaling: float) -> torch.Tensor:
    """W' in place of W, a float32 tensor (the caller casts to the output dtype).

    One fused pass over W (addmm_ adds s * B @ A as it computes it), none of the
    full-size temporaries that `w + s * (B @ A)` allocates.
    """
    w.addmm_(lora.B.to(torch.float32), lora.A.to(torch.float32), alpha=scaling)
    if lora.magnitude is None:
        return w
    row_norm = w.norm(p=2, dim=1, keepdim=True)
    return w.mul_(lora.magnitude.to(torch.float32).view(-1, 1) / row_norm)


class StreamingMerge:
    """A tensor source for `write_weights`: base tensors, with LoRA folded in as each is read."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        adapter: Adapter,
        dtype: torch.dtype,
        tie_embeddings: bool,
        round_trip: RoundTrip | None = None,
    ):
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.round_trip = round_trip
        self.scaling = adapter.scaling
        self.weights = read_adapter_weights(adapter)
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        names = checkpoint.tensors
        missing = [f"{p}.weight" for p in self.weights.modules if f"{p}.weight" not in names]
        missing += [b for b in self.weights.biases if b not in names]
        if round_trip is not None:
            missing += [f"{m}.weight" for m in round_trip.modules if f"{m}.weight" not in names]
        if missing:
            raise StreamingUnsupported(f"base checkpoint has no tensor {missing[0]} (renamed weights?)")
        # A tied model's checkpoint stores the embedding once; the output head is written
        # explicitly as well, because servers whose model code looks up lm_head.weight
        # (TGI for some architectures) fail to load without it.
        self.aliases: dict[str, str] = {}
        if tie_embeddings and "lm_head.weight" not in names:
            embedding = next(
                (n for n in names if n.endswith(("embed_tokens.weight", "embed_in.weight", "wte.weight"))),
                None,
            )
            if embedding is not None:
                self.aliases["lm_head.weight"] = embedding

    def _out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if dtype.is_floating_point else dtype

    def specs(self) -> list[Spec]:
        specs = [(n, info.shape, self._out_dtype(info.dtype)) for n, info in self.checkpoint.tensors.items()]
        for alias, source in self.aliases.items():
            info = self.checkpoint.tensors[source]
            specs.append((alias, info.shape, self._out_dtype(info.dtype)))
        return specs

    def get(self, name: str) -> torch.Tensor:
        source = self.aliases.get(name, name)
        if source in self.weights.biases:
            tensor = self.weights.biases[source]
            return tensor.to(self._out_dtype(tensor.dtype))
        module = (
            self.weights.modules.get(source.removesuffix(".weight")) if source.endswith(".weight") else None
        )
        round_trip = self.round_trip is not None and self.round_trip.applies_to(source)
        if module is None:
            tensor = self.checkpoint.get(source)
            tensor = self.round_trip(tensor) if round_trip else tensor
            return tensor.to(self._out_dtype(tensor.dtype))
        shape = self.checkpoint.tensors[source].shape
        w = self._reused(shape, torch.float32)
        if round_trip:
            w.copy_(self.round_trip(self.checkpoint.get(source)))
        else:
            self.checkpoint.read_into(source, w)
        fold_into(w, module, self.scaling)
        return w if self.dtype == torch.float32 else self._reused(shape, self.dtype).copy_(w)

    def _reused(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` in memory reused for every adapted weight (one per dtype): on
        the CPU, page faults on fresh allocations cost more than the fold itself."""
        numel = math.prod(shape)
        if dtype not in self._buffers or self._buffers[dtype].numel() < numel:
            self._buffers.pop(dtype, None)  # freed before the larger one is taken
            self._buffers[dtype] = torch.empty(numel, dtype=dtype)
        return self._buffers[dtype][:numel].view(shape)


def open_merged(
    base_dir: Path, adapter: Adapter, dtype: torch.dtype, *, tied: bool, round_trip: RoundTrip | None
) -> StreamingMerge:
    return StreamingMerge(Checkpoint(base_dir), adapter, dtype, tied, round_trip)
