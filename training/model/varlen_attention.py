"""Attention within each example of a padding-free batch, under SDPA.

TRL's padding-free batches (`data.packing`, or `training.padding_free` with the recipe's own rows)
flatten a batch into one row of examples whose position ids restart at 0, and hand the example
boundaries to the model as `cu_seq_lens_q` (what flash attention's varlen kernels take). With
`sdpa`, transformers instead builds a block-diagonal causal mask over the whole row and SDPA turns
it into a 16-bit bias in every layer: the attention costs (sum of the example lengths)^2 in compute
and memory, where the examples alone cost the sum of their squares. On the 7B bench's packed
batches (4 x 2,048 tokens, median row 380) that is 7.5x the query-key pairs and a 128 MiB bias per
layer (BENCHMARKS.md).

`sdpa_varlen` is registered with transformers' AttentionInterface and computes exactly the same
attention, per example, with no mask:
  CUDA (fp16/bf16, flash-capable GPU)  torch.nn.attention.varlen.varlen_attn: torch's own flash
                                       attention over all examples in one kernel
  otherwise (the CPU, float32)         SDPA with is_causal on each example in turn
Batches without boundaries (padded ones, evaluation with a cache) and what the boundaries cannot
express (sliding windows, bidirectional attention, softcapping, attention weights) fall through
to transformers' own SDPA, mask and all.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_varlen"
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# torch's flash kernels: Ampere or newer, head dimensions up to 256 in multiples of 8.
FLASH_CAPABILITY = (8, 0)
FLASH_MAX_HEAD_DIM = 256


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface function: query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim];
    returns ([1, tokens, heads, dim], None) like transformers' SDPA."""
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or not _per_example_applies(module, query, key, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = key.shape[1] != query.shape[1]
    if _flash_varlen_applies(query, dropout):
        return _flash_varlen(query, key, value, boundaries, kwargs.get("max_length_q"), scaling, gqa), None
    lengths = _lengths(boundaries)
    outputs = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
        )
        for q, k, v in zip(
            query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True
        )
    ]
    return torch.cat(outputs, 2).transpose(1, 2).contiguous(), None


def _per_example_applies(module, query, key, kwargs) -> bool:
    """One flattened row of causal self-attention with nothing else the mask would carry."""
    causal = kwargs.get("is_causal")
    return (
        query.shape[0] == 1
        and key.shape[2] == query.shape[2]  # no cache in front of the queries
        and (getattr(module, "is_causal", True) if causal is None else causal)
        and not kwargs.get("sliding_window")
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions")
    )


def _flash_varlen_applies(query: torch.Tensor, dropout: float) -> bool:
    return (
        query.is_cuda
        and query.dtype in FLASH_DTYPES
        and dropout == 0.0
        and query.shape[-1] <= FLASH_MAX_HEAD_DIM
        and query.shape[-1] % 8 == 0
        and torch.cuda.get_device_capability(query.device) >= FLASH_CAPABILITY
    )


def _flash_varlen(query, key, value, boundaries, longest, scaling, gqa):
    from torch.nn.attention.varlen import varlen_attn

    boundaries = boundaries.to(device=query.device, dtype=torch.int32)
    if longest is None:
        longest = max(_lengths(boundaries))
    # varlen_attn takes [tokens, heads, dim] (the projections' own layout: no copy); window (-1, 0)
    # is causal attention.
    out = varlen_attn(
        query[0].transpose(0, 1).contiguous(),
        key[0].transpose(0, 1).contiguous(),
        value[0].transpose(0, 1).contiguous(),
        boundaries,
        boundaries,
        int(longest),
        int(longest),
        scale=scaling,
        window_size=(-1, 0),
        enable_gqa=gqa,
    )
    return out.unsqueeze(0)


# Every layer of one forward pass gets the same boundaries tensor: read its lengths once (on a GPU,
# reading them waits for the device).
_last_lengths: tuple[weakref.ref, list[int]] | None = None


def _lengths(boundaries: torch.Tensor) -> list[int]:
    global _last_lengths
    if _last_lengths is not None and _last_lengths[0]() is boundaries:
        return _last_lengths[1]
    lengths = boundaries.diff().tolist()
    _last_lengths = (weakref.ref(boundaries), lengths)
    return lengths


AttentionInterface.register(NAME, sdpa_varlen_attention)
# The same masks as SDPA: the attention function ignores the mask only where it has the boundaries.
AttentionMaskInterface.register(NAME, sdpa_mask)


def enable_varlen_attention(model) -> bool:
    """Switch an SDPA model to `sdpa_varlen`; False where the architecture cannot take it."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
