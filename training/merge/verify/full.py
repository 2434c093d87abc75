"""Check a merge: the merged model must compute what base + adapter computes.

Both models see the same prompts (rendered with the model's chat template); their logits
must agree within the output dtype's rounding, and their greedy continuations are
compared and recorded. The two models are loaded one after the other, never together.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from training.merge.adapters import Adapter
from training.merge.nf4 import RoundTrip
from training.model.loading import disable_cpu_4bit_repacking

PROMPTS = (
    "김치찌개를 맛있게 끓이는 방법을 알려 주세요.",
    "日本で一番高い山は何ですか?",
    "Write one sentence about the sea.",
)
NEW_TOKENS = 8
# Largest |logit difference| allowed, relative to the largest |logit|: rounding the merged
# weight once to the output dtype versus computing W x + B A x separately.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class MergeVerificationError(Exception):
    pass


def _prompt_ids(tokenizer) -> list[torch.Tensor]:
    batch = []
    for text in PROMPTS:
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tokenizer(text, return_tensors="pt").input_ids
        batch.append(ids)
    return batch


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


def verify_merge(
    base_dir: Path,
    adapter: Adapter,
    merged_dir: Path,
    dtype: torch.dtype,
    round_trip: RoundTrip | None = None,
) -> dict:
    """Compare with base + adapter: the original base, or (NF4 round trip) the 4-bit base as trained."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = _prompt_ids(tokenizer)
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

    max_diff = max((a - b).abs().max().item() for a, b in zip(ref_logits, new_logits, strict=True))
    scale = max(a.abs().max().item() for a in ref_logits)
    relative = max_diff / max(scale, 1e-6)
    top1 = torch.cat(
        [(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(ref_logits, new_logits, strict=True)]
    )
    result = {
        "prompts": len(PROMPTS),
        "dtype": str(dtype).removeprefix("torch."),
        "max_abs_logit_diff": max_diff,
        "relative_diff": relative,
        "tolerance": TOLERANCE[dtype],
        "top1_agreement": round(top1.float().mean().item(), 4),
        "greedy_identical": ref_greedy == new_greedy,
        "passed": relative <= TOLERANCE[dtype],
    }
    if not result["passed"]:
        raise MergeVerificationError(
            f"the merged model disagrees with base + adapter: max |logit difference| {max_diff:.4g} "
            f"({relative:.2e} of the logit range) exceeds the {result['dtype']} tolerance {TOLERANCE[dtype]:.0e}"
        )
    return result
