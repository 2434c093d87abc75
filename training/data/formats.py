"""Dataset row formats: check each row and turn it into an Example.

Formats (FORMATS, the one table a recipe's data.format is checked against):
- text: one field of raw text, trained on as a whole.
- instruction: instruction, optional input, output (Alpaca / Dolly style).
- messages: OpenAI-style chat turns [{"role": ..., "content": ...}, ...].

instruction and messages rows become chat turns, rendered later by the recipe's template.
A malformed row raises RowError naming the field; the caller adds the row's location and
applies the recipe's bad-row policy. A new format is one converter and one entry in FORMATS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from training.data.templates import BUILTIN_TEMPLATES, PromptTemplate

ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class MissingField(RowError):
    """A field the format needs is not in the row (the caller can say which fields the row has)."""

    def __init__(self, field: str):
        super().__init__(field, "missing")


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, str]] | None = None
    text: str | None = None

    def as_json(self) -> Any:
        return {"messages": self.messages} if self.messages is not None else {"text": self.text}


def _string(row: dict[str, Any], field: str, *, required: bool = True) -> str:
    if field not in row or row[field] is None:
        if required:
            raise MissingField(field)
        return ""
    value = row[field]
    if not isinstance(value, str):
        raise RowError(field, f"must be a string, got {type(value).__name__} {value!r:.60}")
    if required and not value.strip():
        raise RowError(field, "is empty")
    return value


def text_example(row: dict[str, Any], text_field: str) -> Example:
    return Example(text=_string(row, text_field))


def instruction_example(row: dict[str, Any], template: PromptTemplate | None) -> Example:
    instruction = _string(row, "instruction")
    input_text = _string(row, "input", required=False).strip()
    output = _string(row, "output")
    if template is None:  # the base model's own chat template
        user = f"{instruction}\n\n{input_text}" if input_text else instruction
        prompt = [{"role": "user", "content": user}]
    else:
        if input_text and template.input_join is None:
            raise RowError(
                "input", f"the row has an input but template '{template.name}' has no {{input}} slot"
            )
        prompt = template.instruction_messages(instruction, input_text)
    return Example(messages=[*prompt, {"role": "assistant", "content": output}])


def messages_example(row: dict[str, Any], template: PromptTemplate | None) -> Example:
    messages = row.get("messages")
    if messages is None:
        raise MissingField("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("messages", "must be a non-empty list of {role, content} objects")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RowError(where, f"must be an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"{role!r} is not one of {', '.join(ROLES)}")
        try:
            # An empty system message is harmless; an empty user or assistant turn is a data error.
            content = _string(message, "content", required=role != "system")
        except RowError as e:
            raise RowError(f"{where}.content", e.problem) from None
        clean.append({"role": role, "content": content})
        for key in message:
            if key not in ("role", "content"):
                raise RowError(f"{where}.{key}", "unexpected key; a message has only role and content")
    has_system = clean[0]["role"] == "system"
    if has_system and template is not None and template.system_prefix is None:
        # Caught here, by row: the chat template would raise while the data is tokenized, with no row.
        with_system = [t.name for t in BUILTIN_TEMPLATES.values() if t.system_prefix is not None]
        raise RowError(
            "messages[0].role",
            f"a system message, but template '{template.name}' has no place for one; leave it out, or use "
            f"a template with a system slot: {', '.join(with_system)} or model",
        )
    turns = clean[1:] if has_system else clean
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = i + (len(clean) - len(turns))
            raise RowError(
                f"messages[{index}].role",
                f"expected {expected!r}: after an optional system message, turns alternate user, assistant",
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise RowError("messages", "must end with an assistant message (the response to learn)")
    return Example(messages=clean)


@dataclass(frozen=True)
class RowFormat:
    """A data.format: how a row becomes an Example, and what the recipe must say for it."""

    name: str
    convert: Callable[[dict[str, Any], str, PromptTemplate | None], Example]  # row, text_field, template
    # Rows split into a prompt and a response, so the loss can count the response alone; such rows
    # are rendered by a template (data.template).
    has_response: bool


FORMATS = {
    f.name: f
    for f in (
        RowFormat(
            "text", lambda row, text_field, template: text_example(row, text_field), has_response=False
        ),
        RowFormat(
            "instruction",
            lambda row, text_field, template: instruction_example(row, template),
            has_response=True,
        ),
        RowFormat(
            "messages", lambda row, text_field, template: messages_example(row, template), has_response=True
        ),
    )
}


def row_format(name: str) -> RowFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; one of: {', '.join(FORMATS)}") from None
