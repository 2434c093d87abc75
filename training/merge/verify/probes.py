"""What both verifications share: the probe prompts, the tolerance and the comparison of logits."""

from __future__ import annotations

import torch

PROMPTS = (
    "김치찌개를 맛있게 끓이는 방법을 알려 주세요.",
    "日本で一番高い山は何ですか?",
    "Write one sentence about the sea.",
)
# Largest |logit difference| allowed, relative to the largest |logit|: rounding the merged
# weight once to the output dtype versus computing W x + B A x separately.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class MergeVerificationError(Exception):
    pass


def prompt_ids(tokenizer) -> list[torch.Tensor]:
    """Each probe prompt as the model will see it: rendered with its chat template, if any."""
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


def compare(reference: list[torch.Tensor], merged: list[torch.Tensor], dtype: torch.dtype) -> dict:
    """The figures of a verification, from each prompt's logits ([1, tokens, vocab]) both ways.

    Raises MergeVerificationError when the difference exceeds the output dtype's tolerance.
    """
    max_diff = max((a - b).abs().max().item() for a, b in zip(reference, merged, strict=True))
    scale = max(a.abs().max().item() for a in reference)
    relative = max_diff / max(scale, 1e-6)
    top1 = torch.cat(
        [(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(reference, merged, strict=True)]
    )
    next_tokens = [
        a[0, -1].argmax().item() == b[0, -1].argmax().item() for a, b in zip(reference, merged, strict=True)
    ]
    result = {
        "prompts": len(reference),
        "tokens": sum(a.shape[1] for a in reference),
        "dtype": str(dtype).removeprefix("torch."),
        "max_abs_logit_diff": max_diff,
        "relative_diff": relative,
        "tolerance": TOLERANCE[dtype],
        "top1_agreement": round(top1.float().mean().item(), 4),
        "next_tokens_identical": all(next_tokens),
        "passed": relative <= TOLERANCE[dtype],
    }
    if not result["passed"]:
        raise MergeVerificationError(
            f"the merged model disagrees with base + adapter: max |logit difference| {max_diff:.4g} "
            f"({relative:.2e} of the logit range) exceeds the {result['dtype']} tolerance {TOLERANCE[dtype]:.0e}"
        )
    return result
