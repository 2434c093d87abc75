"""The rows a trained model is judged on: the recipe's validation split (or a file), tokenized as in training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.data.prepare import prepare_data
from training.errors import UserError

if TYPE_CHECKING:
    from training.recipe import DataSection


@dataclass
class EvalData:
    dataset: object  # datasets.Dataset with input_ids (+ assistant_masks)
    prompts: list[list[dict]]  # chat turns up to the last assistant turn
    references: list[str]  # the reference answers to those prompts
    tools: list[list[dict] | None]  # each prompt's function schemas (tool-calling rows), else None
    source: str


def eval_data(cfg: DataSection, tokenizer, prompts: int = 8) -> EvalData:
    """The data section's validation split, tokenized exactly as for training."""
    if cfg.validation is None:
        raise UserError(
            "the recipe has no validation split (data.validation) to evaluate on; add one, or pass --file "
            "with rows in the recipe's format"
        )
    prepared = prepare_data(cfg, tokenizer)
    chats = [e for e in prepared.eval_examples if e.messages is not None][:prompts]
    return EvalData(
        dataset=prepared.eval,
        prompts=[e.messages[:-1] for e in chats],
        references=[e.messages[-1]["content"] for e in chats],
        tools=[e.tools for e in chats],
        source=prepared.eval_report.source,
    )
