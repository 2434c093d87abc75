"""Model weights on disk: read a checkpoint's safetensors shards lazily, write shards one tensor at a time."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from training.errors import UserError
from training.merge.safetensors_dtypes import dtype_of
from training.merge.safetensors_writer import write_streaming
from training.model.hub_files import weight_files

Spec = tuple[str, tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # of the tensor's bytes in the file
    nbytes: int


class Checkpoint:
    """The tensors of a model directory's weights, read one at a time.

    The files are those transformers loads (the index's shards, else model.safetensors), not
    every *.safetensors in the folder. Tensors are read with pread from the offsets in each
    file's header, not through safetensors' memory mapping: touching mapped pages costs a page
    fault per 4 KB (several times the copy itself on a VM), and the pages of a mapping count as
    resident memory.
    """

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.tensors: dict[str, TensorInfo] = {}
        for file in weight_files(model_dir):
            self.tensors.update(_read_header(file))
        self._staging = torch.empty(0, dtype=torch.uint8)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        tensor = torch.empty(info.shape, dtype=info.dtype)
        with info.file.open("rb", buffering=0) as f:
            _read_exactly(f, info.offset, _bytes_of(tensor))
        return tensor

    def read_into(
        self, name: str, out: torch.Tensor, rows: range | None = None, chunk_bytes: int = 8 << 20
    ) -> torch.Tensor:
        """Read `name` (or the `rows` of its first dimension) into `out`, of any dtype or device,
        converting chunk by chunk: the tensor is never held whole in its stored dtype."""
        info = self.tensors[name]
        rows = rows if rows is not None else range(info.shape[0] if info.shape else 1)
        shape = (len(rows), *info.shape[1:]) if info.shape else ()
        if tuple(out.shape) != shape or rows.step != 1:
            raise ValueError(f"{name}: rows {rows} of {info.shape} do not fit into {tuple(out.shape)}")
        flat = out.view(-1)
        itemsize = torch.empty((), dtype=info.dtype).element_size()
        start_byte = info.offset + rows.start * math.prod(info.shape[1:]) * itemsize
        per_chunk = max(chunk_bytes // itemsize, 1)
        if self._staging.numel() < per_chunk * itemsize:
            self._staging = torch.empty(per_chunk * itemsize, dtype=torch.uint8)  # reused by every read
        staging = self._staging[: per_chunk * itemsize].view(info.dtype)
        with info.file.open("rb", buffering=0) as f:
            for start in range(0, flat.numel(), per_chunk):
                piece = staging[: min(per_chunk, flat.numel() - start)]
                _read_exactly(f, start_byte + start * itemsize, _bytes_of(piece))
                flat[start : start + piece.numel()].copy_(piece)
        return out


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """The safetensors header: 8 bytes of length, then JSON naming each tensor's dtype, shape and bytes."""
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        dtype = dtype_of(entry["dtype"], file, name)
        tensors[name] = TensorInfo(file, tuple(entry["shape"]), dtype, 8 + length + start, end - start)
    return tensors


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


def _read_exactly(f, offset: int, into: memoryview) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(f.fileno(), [into[done:]], offset + done)
        if n == 0:
            raise UserError(f"{f.name}: the file ends inside a tensor (truncated download?)")
        done += n


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
