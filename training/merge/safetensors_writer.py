"""Write a safetensors file one tensor at a time.

The safetensors library serializes a whole dict of tensors held in memory. A merge that
streams a 13B model needs to hold one tensor, not one 2-5 GB shard, so the header is
planned up front from the known names, shapes and dtypes, and each tensor's bytes are
appended as it is computed. Files are read back and checked by the safetensors library
itself in the tests.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from training.merge.safetensors_dtypes import name_of


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """Declare every tensor first, then `write` them in the declared order."""

    def __init__(
        self, path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict | None = None
    ):
        self.path = path
        self.specs = specs
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, shape, dtype in specs:
            end = offset + tensor_nbytes(shape, dtype)
            header[name] = {
                "dtype": name_of(dtype, name),
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, shape, dtype = self.specs[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (expected_name, shape, dtype):
            raise ValueError(
                f"{self.path}: expected {expected_name} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._file.write(flat.view(torch.uint8).numpy())  # the buffer itself, no extra copy
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            raise ValueError(
                f"{self.path}: {len(self.specs) - self._next} declared tensors were never written"
            )
        self._file.flush()
        self._file.close()


def write_streaming(
    path: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
) -> None:
    writer = StreamingSafetensorsWriter(path, specs)
    try:
        for name, tensor in tensors:
            writer.write(name, tensor)
        writer.close()
    except BaseException as e:
        writer._file.close()
        if isinstance(e, OSError) and e.filename is None:  # a failed write (disk full) names no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
