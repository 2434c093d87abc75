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
def greedy_answers(
    model, tokenizer, prompts: list[list[dict]], tools: list[list[dict] | None] | None = None
) -> list[str]:
    """`tools`: each prompt's function schemas, rendered as in training (rows with tool calls)."""
    device = next(model.parameters()).device
    answers = []
    for messages, functions in zip(prompts, tools or [None] * len(prompts), strict=True):
        text = tokenizer.apply_chat_template(
            messages, tools=functions, tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of the log-probabilities of the continuation's tokens after the context.

    This is what multiple-choice benchmarks compare between the answers. The text is
    tokenized whole, as the model reads it; a token belongs to the continuation when its
    characters lie after the context. A token spanning both cannot be split and is refused.
    """
    encoded = tokenizer(context + continuation, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    boundary = len(context)
    # Special tokens (BOS) cover no characters: (0, 0).
    scored = [i for i, (start, end) in enumerate(offsets) if end > start and end > boundary]
    if not scored or offsets[scored[0]][0] < boundary:
        raise ValueError(f"no token boundary between the context and {continuation!r}")
    if scored[0] == 0:
        raise ValueError("the continuation starts the text: there is no token before it to predict it")
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[i - 1, ids[i]] for i in scored))
