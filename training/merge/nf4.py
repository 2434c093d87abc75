"""The NF4 (or FP4) round trip of a weight: what a 4-bit layer computed with during training.

QLoRA trains the adapter against dequantize(quantize(W)), not W. Quantizing and
dequantizing with bitsandbytes' own functions, the same block size, quant type, double
quantization and dtype as the training run, reproduces those weights exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes.functional as F
import torch

from training.errors import UserError


@dataclass(frozen=True)
class RoundTrip:
    quant_type: str  # nf4 or fp4
    blocksize: int
    double_quant: bool
    load_dtype: torch.dtype  # the dtype the weights were loaded in before being quantized
    modules: frozenset[str]  # the module paths that were quantized

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:

        device = "cuda" if torch.cuda.is_available() else "cpu"
        w = weight.to(device=device, dtype=self.load_dtype).contiguous()
        packed, state = F.quantize_4bit(
            w, blocksize=self.blocksize, compress_statistics=self.double_quant, quant_type=self.quant_type
        )
        return F.dequantize_4bit(packed, state).to("cpu")

    def applies_to(self, tensor_name: str) -> bool:
        return tensor_name.endswith(".weight") and tensor_name.removesuffix(".weight") in self.modules


def round_trip_of_run(run: dict, source: str) -> RoundTrip:
    """The round trip that the training run recorded in run.json applied."""
    if not run:
        raise UserError(f"{source}: the NF4 round trip needs the run.json of the training run (none found)")
    quantization = run["recipe"]["quantization"]
    if quantization["method"] not in ("nf4", "fp4"):
        raise UserError(
            f"{source}: training used quantization.method {quantization['method']}; the NF4 round trip only "
            "applies to 4-bit (nf4, fp4) training. Merge onto the original weights (merge.base: original)."
        )
    modules = run["model"].get("quantized_modules")
    if not modules:
        raise UserError(
            f"{source}: run.json does not list the quantized modules (trained by an older version?)"
        )
    return RoundTrip(
        quant_type=quantization["method"],
        blocksize=run["model"]["blocksize"],
        double_quant=quantization["double_quant"],
        load_dtype=getattr(torch, run["compute_dtype"]),
        modules=frozenset(modules),
    )
