"""Model FLOPs utilisation (MFU) of a QLoRA run, on two bases, from the model's config alone.

  model basis  6 N + 12 L h s per token, as PaLM's appendix counts it (N: the parameters of every
               matmul, the output head included; L layers, h hidden size, s the context a token
               attends over, counted whole as PaLM does: for rows of s_i tokens, padded or packed,
               sum(s_i^2) / sum(s_i), attention_context): comparable with full fine-tuning reports.
  LoRA basis   4 N + 6 N_lora + 12 L h s: what LoRA training needs. The frozen matmuls run
               forward and pass gradients back to their inputs (2 N + 2 N) but compute no weight
               gradients; the adapters (N_lora: A and B of every targeted layer) do all three; the
               attention scores and their gradients cost the same as in full fine-tuning.

Neither counts activation checkpointing's recomputation: it is work the GPU does, not work the
model needs. Random weights cost the same FLOPs as trained ones.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets, in TFLOP/s.
GPU_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "L4": 121.0}


def flop_terms(config, lora) -> dict | None:
    """The model's share of the FLOPs per token, from the shapes the memory estimator reads off the
    config: frozen matmul and adapter (`lora`: a recipe's lora section) parameters, and the
    attention's FLOPs per token and per position of context; None for an architecture it does not know."""
    from training.errors import RecipeError
    from training.train.estimate import Shape, lora_target_names

    try:
        shape = Shape.from_config(config)
        targets = lora_target_names(lora, shape)
    except RecipeError:
        return None
    adapters = sum(lora.r * (lin.inputs + lin.outputs) for lin in shape.linears if lin.name in targets)
    return {
        "matmul_params": shape.linear_params + shape.hidden * shape.vocab,  # + the output head
        "lora_params": shape.layers * adapters,
        "attention_per_position": 12 * shape.layers * shape.hidden,
    }


def attention_context(lengths) -> float:
    """The mean context a token attends over, weighted by tokens: a row of s tokens gives each of its
    s tokens a context of s (padding and the other examples of a packed batch are not work the
    model needs). The mean row length would undercount uneven rows."""
    lengths = [int(n) for n in lengths]
    return sum(n * n for n in lengths) / sum(lengths)


def flops_per_token(terms: dict, seq_len: float, basis: str = "model") -> float:
    attention = terms["attention_per_position"] * seq_len
    if basis == "model":
        return 6 * terms["matmul_params"] + attention
    if basis == "lora":
        return 4 * terms["matmul_params"] + 6 * terms["lora_params"] + attention
    raise ValueError(f"basis {basis!r}: model or lora")


def peak_flops(gpu: str | None, override: float | None = None) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s: the given TFLOP/s, else the data sheet's for a known GPU."""
    if override:
        return override * 1e12
    for name, tflops in GPU_PEAK_TFLOPS.items():
        if gpu and name in gpu:
            return tflops * 1e12
    return None
