"""The errors a malformed row raises, naming the field as the row spells it; the caller adds the
row's location and applies the recipe's bad-row policy (training.data.prepare)."""

from __future__ import annotations


class RowError(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class MissingField(RowError):
    """A field the format needs is not in the row (the caller can say which fields the row has)."""

    def __init__(self, field: str):
        super().__init__(field, "missing")


class TemplateMismatch(RowError):
    """The row is well-formed, but the recipe's template has no place for a part of it. Not skipped
    by data.on_bad_row: skipping would quietly train on the other rows only (all tool-call rows, say)."""
