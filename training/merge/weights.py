"""Model weights on disk: read a checkpoint's safetensors shards lazily, write shards one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open

from training.merge.safetensors_dtypes import dtype_of
from training.merge.safetensors_writer import write_streaming
from training.model.hub_files import weight_files

Spec = tuple[str, tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class Checkpoint:
    """The tensors of a model directory's weights, read one at a time.

    The files are those transformers loads (the index's shards, else model.safetensors), not
    every *.safetensors in the folder. Each read opens the file anew: safetensors memory-maps
    it, and pages of a mapping that stays open stay resident, so reading a whole model through
    open handles would grow the process to the model's size.
    """

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.tensors: dict[str, TensorInfo] = {}
        for file in weight_files(model_dir):
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    shape, dtype = tuple(piece.get_shape()), dtype_of(piece.get_dtype(), file, name)
                    self.tensors[name] = TensorInfo(file, shape, dtype)

    def get(self, name: str) -> torch.Tensor:
        # The tensor keeps a private mapping of its own bytes, released when it is freed.
        with safe_open(self.tensors[name].file, framework="pt") as handle:
            return handle.get_tensor(name)


def write_weights(
    out_dir: Path, specs: list[Spec], get: Callable[[str], torch.Tensor], max_shard_size: str | int
) -> dict:
    """Write `specs` (computed one by one by `get`) as safetensors shards plus an index when sharded.

    Shards are planned by huggingface_hub's own splitter (the same names and index that
    save_pretrained writes), from meta tensors, so planning costs no memory.
    """
    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape, dtype in specs}
    split = split_torch_state_dict_into_shards(
        meta, max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors"
    )
    by_name = {name: (name, shape, dtype) for name, shape, dtype in specs}
    for filename, names in split.filename_to_tensors.items():
        shard_specs = [by_name[n] for n in names]
        write_streaming(out_dir / filename, shard_specs, ((n, get(n)) for n in names))
    if split.is_sharded:
        index = {
            "metadata": {"total_size": split.metadata["total_size"]},
            "weight_map": split.tensor_to_filename,
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"shards": sorted(split.filename_to_tensors), "total_bytes": split.metadata["total_size"]}
