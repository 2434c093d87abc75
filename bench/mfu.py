"""Model FLOPs utilisation (MFU) of a QLoRA run, on two bases, from the model's config alone.

  model basis  6 N + 12 L h s per token, as PaLM's appendix counts it (N: the parameters of every
               matmul, the output head included; L layers, h hidden size, s the mean sequence
               length): comparable with full fine-tuning reports.
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

# Architectures whose decoder layers have Llama's seven linear layers.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def linear_shapes(config) -> dict[str, tuple[int, int]] | None:
    """(inputs, outputs) of each linear layer of one decoder layer, by name; None if unknown."""
    h, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    if config.model_type in LLAMA_LIKE:
        return {
            "q_proj": (h, heads * head_dim),
            "k_proj": (h, kv_heads * head_dim),
            "v_proj": (h, kv_heads * head_dim),
            "o_proj": (heads * head_dim, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }
    if config.model_type == "gpt_neox":
        return {
            "query_key_value": (h, 3 * h),
            "dense": (h, h),
            "dense_h_to_4h": (h, inter),
            "dense_4h_to_h": (inter, h),
        }
    return None


def lora_targets(target_modules, include_mlp: bool, config) -> list[str]:
    """The layer names a recipe's lora.target_modules (a list, auto or all-linear) adapts."""
    from training.model.lora import AUTO_TARGETS

    if target_modules == "auto":
        auto = AUTO_TARGETS[config.model_type]
        return auto["attention"] + (auto["mlp"] if include_mlp else [])
    if target_modules == "all-linear":
        return list(linear_shapes(config) or {})
    return list(target_modules)


def flop_terms(config, lora_r: int, targets: list[str]) -> dict | None:
    """The model's share of the FLOPs per token: frozen matmul and adapter parameters, and the
    attention's FLOPs per token and per position of context; None for an unknown architecture."""
    shapes = linear_shapes(config)
    if shapes is None:
        return None
    layers, h = config.num_hidden_layers, config.hidden_size
    per_layer = sum(i * o for i, o in shapes.values())
    adapters = sum(lora_r * (i + o) for name, (i, o) in shapes.items() if name in targets)
    return {
        "matmul_params": layers * per_layer + h * config.vocab_size,  # + the output head
        "lora_params": layers * adapters,
        "attention_per_position": 12 * layers * h,
    }


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
