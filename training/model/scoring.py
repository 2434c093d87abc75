"""What a causal LM computes on evaluation rows: perplexity over the loss tokens, greedy answers."""

from __future__ import annotations

import math

import torch

MAX_NEW_TOKENS = 32


@torch.no_grad()
def perplexity(model, dataset) -> dict:
    """exp(mean negative log-likelihood) over the tokens that count toward the loss."""
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for row in dataset:
        ids = torch.tensor([row["input_ids"]], device=device)
        mask = torch.tensor([row.get("assistant_masks") or [1] * ids.shape[1]], device=device)
        labels = ids.masked_fill(mask == 0, -100)
        counted = int(mask[0, 1:].sum())
        if counted == 0:
            continue
        loss = model(input_ids=ids, labels=labels).loss.float().item()
        nll += loss * counted
        tokens += counted
    mean = nll / max(tokens, 1)
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": tokens}


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[dict]]) -> list[str]:
    device = next(model.parameters()).device
    answers = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers
