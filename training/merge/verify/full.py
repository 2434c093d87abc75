"""The full verification: both models loaded whole through from_pretrained, one after the other.

On top of what the streamed verification compares, it loads the merged directory the way
users will (config, weights and tokenizer through from_pretrained), compares greedy
continuations of NEW_TOKENS tokens (generation with its cache), and, for the NF4 round-trip
base, computes the reference with bitsandbytes' own 4-bit layers rather than their
dequantized weights. It needs memory for the whole model.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from training.merge.adapters import Adapter
from training.merge.nf4 import RoundTrip
from training.merge.verify.probes import compare, prompt_ids
from training.model.loading import disable_cpu_4bit_repacking

NEW_TOKENS = 8


@torch.no_grad()
def _run(model, batch: list[torch.Tensor], pad_id: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    device = next(model.parameters()).device
    logits, greedy = [], []
    for ids in batch:
        ids = ids.to(device)
        logits.append(model(ids).logits.float().cpu())
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id)
        greedy.append(out[0, ids.shape[1] :].tolist())
    return logits, greedy


def verify_full(
    base_dir: Path,
    adapter: Adapter,
    merged_dir: Path,
    dtype: torch.dtype,
    round_trip: RoundTrip | None = None,
) -> dict:
    """Compare with base + adapter: the original base, or (NF4 round trip) the 4-bit base as trained."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = prompt_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    load = {"dtype": dtype, "trust_remote_code": adapter.trust_remote_code}

    if round_trip is None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, **load).to(device)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=round_trip.quant_type,
            bnb_4bit_use_double_quant=round_trip.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
        load_4bit = {**load, "dtype": round_trip.load_dtype, "quantization_config": quantization}
        base = AutoModelForCausalLM.from_pretrained(base_dir, **load_4bit, device_map={"": device})
        disable_cpu_4bit_repacking(base)
    reference = PeftModel.from_pretrained(base, adapter.path).eval()
    ref_logits, ref_greedy = _run(reference, batch, pad_id)
    del reference, base
    gc.collect()

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, **load).to(device).eval()
    new_logits, new_greedy = _run(merged, batch, pad_id)
    del merged
    gc.collect()

    result = compare(ref_logits, new_logits, dtype)
    result["greedy_tokens"] = NEW_TOKENS
    result["greedy_identical"] = ref_greedy == new_greedy
    return result
