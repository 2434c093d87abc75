"""Tokenize examples for TRL and count what the trainer will actually learn from.

TRL's SFTTrainer accepts pre-tokenized datasets (`input_ids`, plus `assistant_masks` for
response-only loss) and then builds labels, truncates to max_length and packs by itself.
It also silently drops examples whose response was cut away entirely. Tokenizing here
lets us count those rows, the truncated rows and the tokens that count toward the loss,
and stop before training when too much of the data would be wasted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import groupby

from datasets import Dataset
from jinja2 import TemplateError

from training.data.chat_tokens import tokenize_chats
from training.data.formats import Example
from training.data.tool_calls import check_rendered
from training.errors import DataError

BATCH = 256


@dataclass
class TokenStats:
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    rows_over_max_length: int = 0
    rows_dropped_no_loss: int = 0
    longest: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("lengths")
        d["mean_length"] = round(sum(self.lengths) / len(self.lengths), 1) if self.lengths else 0
        return d


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    *,
    chat_template: str | None,
    completion_only: bool,
    max_length: int,
    truncates: bool,
) -> tuple[Dataset, TokenStats]:
    """Return the dataset TRL trains on and what it contains.

    `truncates`: whether TRL will cut sequences at max_length (always, except with the
    bfd_split and wrapped packing strategies, which split long sequences instead).
    """
    input_ids: list[list[int]] = []
    masks: list[list[int]] = []
    for start in range(0, len(examples), BATCH):
        batch = examples[start : start + BATCH]
        if batch[0].messages is None:
            input_ids += _tokenize_text([e.text for e in batch], tokenizer)
            continue
        # The chat template takes one tools= per call: rows in a run with the same tools (or none) share one.
        for tools, run in groupby(batch, key=lambda e: e.tools):
            chats = list(run)
            if any(e.tool_field is not None for e in chats):
                _check_tool_rendering(chats, tokenizer, chat_template, tools)
            ids, chat_masks = tokenize_chats(
                tokenizer, chats, tools=tools, chat_template=chat_template, completion_only=completion_only
            )
            input_ids += ids
            if completion_only:
                masks += chat_masks

    stats = TokenStats()
    kept_ids, kept_masks = [], []
    for i, ids in enumerate(input_ids):
        mask = masks[i] if completion_only else [1] * len(ids)
        limit = max_length if truncates else len(ids)
        # The first token is never a target: each position predicts the next token.
        counted = sum(mask[1:limit])
        if counted == 0:
            stats.rows_dropped_no_loss += 1
            continue
        stats.rows += 1
        stats.tokens += min(len(ids), limit)
        stats.loss_tokens += counted
        stats.rows_over_max_length += len(ids) > max_length
        stats.longest = max(stats.longest, len(ids))
        stats.lengths.append(len(ids))
        kept_ids.append(ids)
        kept_masks.append(mask)

    columns = {"input_ids": kept_ids}
    if completion_only:
        columns["assistant_masks"] = kept_masks
    return Dataset.from_dict(columns), stats


def _check_tool_rendering(chats: list[Example], tokenizer, chat_template: str | None, tools) -> None:
    """A template may render the probe's tool call and drop a real row's (a second call in one turn),
    or refuse the row (Llama 3.1 takes one call per turn): each tool row is rendered as text once
    more, on its own so that an error names it, and checked."""
    for example in chats:
        if example.tool_field is None:
            continue
        try:
            text = tokenizer.apply_chat_template(
                example.messages, tools=tools, chat_template=chat_template, tokenize=False
            )
        except TemplateError as e:
            raise DataError(f"{example.where}: the chat template refuses the row: {e}") from None
        check_rendered(example, text)


def _tokenize_text(texts: list[str], tokenizer) -> list[list[int]]:
    """Plain text plus EOS, so the model learns where a document ends."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [seq if seq and seq[-1] == eos else [*seq, eos] for seq in ids]
