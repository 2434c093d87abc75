"""The GGUF quantization types an export offers, and what each may differ from the merged model.

Apart from training.merge.verify_gguf (torch, transformers) so that `python -m training export`
checks --quant and prints its help without them: training/cli/__init__.py says why.
"""

from __future__ import annotations

from dataclasses import dataclass

# The type serve --backend llamacpp looks for unless told: export writes it unless told.
from serving.backends.llamacpp import DEFAULT_QUANT  # noqa: F401 (re-exported)
from training.errors import UserError


@dataclass(frozen=True)
class Tolerance:
    """Largest mean KL(merged || GGUF) in nats per token over the probe positions."""

    mean_kl: float
    why: str


# Measured on the tiny models (README: GGUF export) and kept well above what llama.cpp's own
# KL statistics report for real models of each type; a broken conversion (wrong rope, tokenizer,
# transposed or missing tensor) is orders of magnitude above every one of them.
TOLERANCE = {
    "f32": Tolerance(1e-5, "no rounding of weights; only the order of floating-point sums differs"),
    "f16": Tolerance(1e-3, "weights rounded to 16-bit floats"),
    "bf16": Tolerance(1e-2, "weights rounded to bfloat16 (8 bits of mantissa)"),
    "q8_0": Tolerance(1e-2, "8-bit blocks of 32 with one scale each"),
    "q6_k": Tolerance(3e-2, "6-bit k-quant (or 8-bit where rows are not a multiple of 256)"),
    "q5_k_m": Tolerance(6e-2, "5-bit k-quant, 6-bit for some tensors"),
    "q4_k_m": Tolerance(1.5e-1, "4-bit k-quant, 6-bit for some tensors"),
}
QUANTS = tuple(TOLERANCE)  # f32 f16 bf16 q8_0 q6_k q5_k_m q4_k_m


def parse_quants(values: list[str]) -> tuple[str, ...]:
    """--quant q8_0 --quant q4_k_m, or q8_0,q4_k_m: known types, each once, in the order given."""
    quants = [q.strip().lower() for v in values for q in v.split(",") if q.strip()]
    unknown = [q for q in quants if q not in QUANTS]
    if unknown or not quants:
        raise UserError(f"--quant {', '.join(unknown) or '(none)'}: choose from {', '.join(QUANTS)}")
    return tuple(dict.fromkeys(quants))
