"""From the recipe's data section to the tokenized train and eval datasets TRL trains on.

read rows -> check and convert each row (bad-row policy) -> split off validation (read_examples)
-> check that the chat template renders the rows' tool calls, if any -> tokenize with the chat
template -> refuse data that would teach nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from datasets import Dataset
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from training.data.formats import (
    FORMATS,
    MESSAGES,
    SHAREGPT,
    ChatLayout,
    Example,
    MissingField,
    RowError,
    TemplateMismatch,
)
from training.data.sources import SourceRow, read_rows
from training.data.templates import MODEL_TEMPLATE, PromptTemplate, resolve_template, tokenizer_adds_bos
from training.data.tokenization import TokenStats, tokenize_examples
from training.data.tool_calls import TOOL_TEMPLATE_HINT, tool_template_problem
from training.errors import DataError

if TYPE_CHECKING:  # the recipe names the data layer's types; data does not depend on it
    from training.recipe import DataSection

log = logging.getLogger(__name__)

# Both splits get a seed of their own so the validation rows do not depend on training settings.
SPLIT_SEED = 1234


@dataclass
class SplitReport:
    source: str
    rows_read: int = 0
    rows_skipped_bad: int = 0
    bad_rows: list[str] = field(default_factory=list)  # the first few, for the log and run.json
    rows_with_tools: int = 0  # rows with tool calls, tool results or tools
    tokens: TokenStats = field(default_factory=TokenStats)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_skipped_bad": self.rows_skipped_bad,
            "bad_rows_sample": self.bad_rows,
            "rows_with_tools": self.rows_with_tools,
            **self.tokens.as_dict(),
        }


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset | None
    chat_template: str | None  # saved with the model; None when neither recipe nor base has one
    fingerprint: str
    train_report: SplitReport
    eval_report: SplitReport | None
    eval_examples: list[Example] = field(default_factory=list)  # untokenized, for prompts in evaluation

    def report(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "train": self.train_report.as_dict(),
            "eval": self.eval_report.as_dict() if self.eval_report else None,
        }


@dataclass
class Rows:
    """The recipe's rows, checked and converted, split into training and validation; not tokenized."""

    train: list[Example]
    train_report: SplitReport
    eval: list[Example] | None
    eval_report: SplitReport | None


def read_examples(cfg: DataSection, template: PromptTemplate | None) -> Rows:
    """Read the data, check and convert each row (bad-row policy), split off validation. Needs no
    tokenizer: `validate` runs it too, so that a bad row stops a recipe before a model is loaded."""
    train_rows = read_rows(
        cfg.source,
        split=cfg.split,
        subset=cfg.subset,
        revision=cfg.revision,
        max_rows=cfg.max_rows,
        encoding=cfg.encoding,
    )
    train_examples, train_report = convert_rows(train_rows, cfg, template, source=cfg.source)
    eval_examples, eval_report = None, None
    if cfg.validation is not None:
        v = cfg.validation
        if v.fraction is not None:
            train_examples, eval_examples = _split_off(train_examples, v.fraction, cfg.source)
            eval_report = SplitReport(
                source=f"{v.fraction:.0%} of {cfg.source}",
                rows_read=len(eval_examples),
                rows_with_tools=sum(e.tool_field is not None for e in eval_examples),
            )
            train_report.rows_read -= eval_report.rows_read
            train_report.rows_with_tools -= eval_report.rows_with_tools
        else:
            source = v.file or cfg.source
            rows = read_rows(
                source,
                split=v.split or "train",
                subset=cfg.subset,
                revision=cfg.revision,
                # A validation file from elsewhere may be in another encoding than data.source.
                encoding=v.encoding or cfg.encoding,
                encoding_key="data.validation.encoding" if v.file else "data.encoding",
            )
            eval_examples, eval_report = convert_rows(rows, cfg, template, source=source)
    if not train_examples:
        raise DataError(f"{cfg.source}: no usable training rows")
    return Rows(train_examples, train_report, eval_examples, eval_report)


def prepare_data(cfg: DataSection, tokenizer, *, truncates: bool = True) -> PreparedData:
    template = resolve_template(cfg.template) if cfg.template else None
    training_template, saved_template = chat_templates(cfg, template, tokenizer)
    rows = read_examples(cfg, template)
    _check_tool_template(rows, cfg, tokenizer, training_template)

    def tokenize(examples: list[Example], report: SplitReport, split: str) -> Dataset:
        dataset, report.tokens = tokenize_examples(
            examples,
            tokenizer,
            chat_template=training_template,
            completion_only=cfg.loss_on_completion_only,
            max_length=cfg.max_length,
            truncates=truncates,
        )
        _refuse_wasted_rows(report, cfg, split)
        return dataset

    train = tokenize(rows.train, rows.train_report, "training")
    evaluation = tokenize(rows.eval, rows.eval_report, "validation") if rows.eval else None
    return PreparedData(
        train=train,
        eval=evaluation,
        chat_template=saved_template,
        fingerprint=_fingerprint(rows.train, rows.eval or []),
        train_report=rows.train_report,
        eval_report=rows.eval_report,
        eval_examples=rows.eval or [],
    )


def chat_templates(
    cfg: DataSection, template: PromptTemplate | None, tokenizer
) -> tuple[str | None, str | None]:
    """(template used to tokenize training data, template saved with the model)."""
    if cfg.template == MODEL_TEMPLATE:
        own = tokenizer.chat_template
        if not own:
            raise DataError(
                "data.template is 'model', but the base tokenizer has no chat template; choose a "
                "built-in template (koalpaca, dolly-ja, alpaca) or a custom template string"
            )
        if not cfg.loss_on_completion_only:
            return own, own

        if has_generation_markers(own):
            return own, own
        # TRL's training version of the template marks the responses; without one, the responses
        # are found by rendering (training.data.chat_tokens).
        try:
            patched = get_training_chat_template(tokenizer)
        except ValueError:
            patched = None
        return patched or own, own
    if template is None:  # format text without a template: keep whatever the base model has
        if not tokenizer.chat_template:
            log.warning(
                "No chat template: data.template is not set and the base tokenizer has none, so "
                "chat endpoints (/v1/chat/completions) will not work with this model. Set "
                "data.template to the format your text is written in (e.g. koalpaca)."
            )
        return None, tokenizer.chat_template
    jinja = template.chat_template(add_bos=tokenizer_adds_bos(tokenizer))
    return jinja, jinja


def _check_tool_template(rows: Rows, cfg: DataSection, tokenizer, training_template: str | None) -> None:
    """Once, before tokenizing: can the chat template train on the rows' tool calls? (Rows converted
    for a built-in or custom template were refused already: those have no place for tools.)"""
    examples = [*rows.train, *(rows.eval or [])]
    first = next((e for e in examples if e.tool_field is not None), None)
    if first is None:
        return
    problem = tool_template_problem(
        tokenizer,
        training_template,
        completion_only=cfg.loss_on_completion_only,
        with_tools=any(e.tools for e in examples),
    )
    if problem:
        raise DataError(f"{first.where}: {first.tool_field}: {problem}; {TOOL_TEMPLATE_HINT}")


def convert_rows(
    rows: list[SourceRow], cfg: DataSection, template: PromptTemplate | None, *, source: str
) -> tuple[list[Example], SplitReport]:
    report = SplitReport(source=source, rows_read=len(rows))
    examples = []
    for row in rows:
        try:
            example = replace(_convert(row, cfg, template), where=row.where)
        except TemplateMismatch as e:
            raise DataError(
                f"{row.where}: {e}\n(format '{cfg.format}'; data.on_bad_row: skip does not skip such rows, as "
                "it is the template that cannot render them)"
            ) from None
        except RowError as e:
            message = f"{row.where}: {e}"
            if cfg.on_bad_row == "error":
                raise DataError(
                    f"{message}\n(format '{cfg.format}'; fix the row, or set data.on_bad_row: skip to "
                    "skip and count such rows)"
                ) from None
            report.rows_skipped_bad += 1
            if len(report.bad_rows) < 5:
                report.bad_rows.append(message)
            continue
        examples.append(example)
        report.rows_with_tools += example.tool_field is not None
    if report.rows_skipped_bad:
        log.warning(
            "Skipped %d malformed row(s) of %d in %s, e.g. %s",
            report.rows_skipped_bad,
            report.rows_read,
            source,
            report.bad_rows[0],
        )
    return examples, report


def _convert(row: SourceRow, cfg: DataSection, template: PromptTemplate | None) -> Example:
    if row.parse_error:
        raise RowError("(row)", row.parse_error)
    if not isinstance(row.value, dict):
        raise RowError("(row)", f"must be an object with named fields, got {type(row.value).__name__}")
    value = dict(row.value)
    for src, dst in cfg.columns.items():
        if src in value:
            value[dst] = value.pop(src)
    try:
        return FORMATS[cfg.format].convert(value, cfg, template)
    except MissingField as e:
        if e.field in value:  # present but null
            raise
        fields = ", ".join(repr(str(name)) for name in value)
        raise RowError(
            e.field, f"missing; the row has {fields or 'no fields'}{_missing_field_hint(value, e.field)}"
        ) from None


def _missing_field_hint(row: dict, missing: str) -> str:
    """How a row without the field its format needs may still be read."""
    for name, layout in (("messages", MESSAGES), ("sharegpt", SHAREGPT)):
        turns = row.get(layout.field)
        first_turn = turns[0] if isinstance(turns, list) and turns else None
        if layout.field != missing and isinstance(first_turn, dict) and _has_keys(first_turn, layout):
            return f" (its turns are format {name}'s: set data.format: {name})"
    if not row:
        return ""
    # Own exports often name their columns otherwise (質問, 답변, question, dialog).
    return f" (data.columns renames fields, e.g. {{{next(iter(row))}: {missing}}})"


def _has_keys(turn: dict, layout: ChatLayout) -> bool:
    return {layout.role_key, layout.content_key} <= set(turn)


def _split_off(examples: list[Example], fraction: float, source: str) -> tuple[list[Example], list[Example]]:
    n_eval = round(len(examples) * fraction)
    if n_eval < 1 or n_eval >= len(examples):
        raise DataError(
            f"{source}: data.validation {fraction} of {len(examples)} rows leaves "
            f"{n_eval} validation rows; need at least one row in each split"
        )
    order = list(range(len(examples)))
    random.Random(SPLIT_SEED).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    evaluation = [e for i, e in enumerate(examples) if i in eval_idx]
    return train, evaluation


def _refuse_wasted_rows(report: SplitReport, cfg: DataSection, split: str) -> None:
    stats = report.tokens
    total = stats.rows + stats.rows_dropped_no_loss
    if stats.rows_dropped_no_loss:
        log.warning(
            "%s: dropped %d of %d rows whose response lies entirely beyond max_length=%d",
            split,
            stats.rows_dropped_no_loss,
            total,
            cfg.max_length,
        )
    if total and stats.rows_dropped_no_loss / total > cfg.max_dropped_fraction:
        raise DataError(
            f"{report.source}: {stats.rows_dropped_no_loss} of {total} {split} rows "
            f"({stats.rows_dropped_no_loss / total:.0%}) have no response token within "
            f"data.max_length={cfg.max_length}, more than data.max_dropped_fraction="
            f"{cfg.max_dropped_fraction}. Raise data.max_length, shorten the prompts, or raise "
            "data.max_dropped_fraction."
        )
    if stats.rows == 0:
        raise DataError(f"{report.source}: no {split} row has a token to learn from")


def _fingerprint(train: list[Example], evaluation: list[Example]) -> str:
    h = hashlib.sha256()
    for split, examples in (("train", train), ("eval", evaluation)):
        h.update(split.encode())
        for e in examples:
            h.update(json.dumps(e.as_json(), ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()[:16]
