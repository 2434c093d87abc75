"""The dtypes the merge reads and writes, by their names in the safetensors format.

The same table as the safetensors library's own (0.8: `safetensors.torch._TYPES`, private),
FP8 included. A checkpoint with a dtype outside it (FP4, FP8 E8M0 scales, complex) stops
with the file, the tensor and what is supported, not a bare KeyError.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.errors import UserError

BY_NAME: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
BY_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in BY_NAME.items()}
FLOAT8 = frozenset(dtype for name, dtype in BY_NAME.items() if name.startswith("F8_"))
# Every FP8 value is exactly a bfloat16 value (bf16 has more exponent and mantissa bits), so
# FP8 weights widen to bf16 without loss; servers and the LoRA delta need a 16-bit type.
FLOAT8_WIDENS_TO = torch.bfloat16


def dtype_of(name: str, file: Path, tensor: str) -> torch.dtype:
    """The torch dtype of a tensor stored as `name` in `file`."""
    if name not in BY_NAME:
        raise UserError(
            f"{file}: tensor {tensor} has dtype {name}, which the merge does not read "
            f"(supported: {', '.join(BY_NAME)})"
        )
    return BY_NAME[name]


def name_of(dtype: torch.dtype, tensor: str) -> str:
    """The safetensors name of `dtype`, for writing `tensor`."""
    if dtype not in BY_DTYPE:
        supported = ", ".join(str(d).removeprefix("torch.") for d in BY_DTYPE)
        raise UserError(f"cannot write tensor {tensor} as {dtype} in safetensors (supported: {supported})")
    return BY_DTYPE[dtype]
