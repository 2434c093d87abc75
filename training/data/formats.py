"""Dataset row formats: check each row and turn it into an Example.

Formats (FORMATS, the one table a recipe's data.format is checked against):
- text: one field of raw text, trained on as a whole.
- instruction: instruction, optional input, output (Alpaca / Dolly style).
- messages: OpenAI-style chat turns [{"role": ..., "content": ...}, ...].
- sharegpt: ShareGPT chat turns {"conversations": [{"from": ..., "value": ...}, ...]}.

instruction and chat rows become chat turns, rendered later by the recipe's template.
A malformed row raises RowError naming the field; the caller adds the row's location and
applies the recipe's bad-row policy. A new format is one converter and one entry in FORMATS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from training.data.templates import BUILTIN_TEMPLATES, PromptTemplate

if TYPE_CHECKING:  # the recipe names the data layer's types; data does not depend on it
    from training.recipe import DataSection

ROLES = ("system", "user", "assistant")

# ShareGPT speaker names: LLaMA-Factory's defaults (human, gpt, system) and those axolotl's
# chat_template also takes (user, assistant). Any other name maps through data.roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


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


@dataclass(frozen=True)
class ChatLayout:
    """How a chat format spells a conversation, so that each error names the field as the row has it."""

    field: str  # the row's list of turns
    role_key: str
    content_key: str
    roles: Mapping[str, str]  # role name in the row -> system, user or assistant
    # OpenAI messages have nothing more a template could use; ShareGPT exports carry extra keys
    # per turn (weight in SlimOrca and OpenHermes), which are ignored rather than refused.
    only_role_and_content: bool
    unknown_role_hint: str = ""
    system_field: str | None = None  # a row's system prompt beside its turns


MESSAGES = ChatLayout("messages", "role", "content", {r: r for r in ROLES}, only_role_and_content=True)
SHAREGPT = ChatLayout(
    "conversations",
    "from",
    "value",
    SHAREGPT_ROLES,
    only_role_and_content=False,
    unknown_role_hint="; data.roles maps other names, e.g. {bot: assistant}",
    system_field="system",
)


def messages_example(row: dict[str, Any], template: PromptTemplate | None) -> Example:
    return chat_example(row, template, MESSAGES)


def sharegpt_example(
    row: dict[str, Any], template: PromptTemplate | None, extra_roles: Mapping[str, str] | None = None
) -> Example:
    layout = replace(SHAREGPT, roles={**SHAREGPT_ROLES, **extra_roles}) if extra_roles else SHAREGPT
    return chat_example(row, template, layout)


def chat_example(row: dict[str, Any], template: PromptTemplate | None, layout: ChatLayout) -> Example:
    turns = row.get(layout.field)
    if turns is None:
        raise MissingField(layout.field)
    if not isinstance(turns, list) or not turns:
        raise RowError(
            layout.field, f"must be a non-empty list of {{{layout.role_key}, {layout.content_key}}} objects"
        )
    messages = [_chat_turn(turn, f"{layout.field}[{i}]", layout) for i, turn in enumerate(turns)]
    system = _row_system_prompt(row, messages, template, layout)
    _check_turn_order(messages, [turn[layout.role_key] for turn in turns], template, layout)
    return Example(messages=[system, *messages] if system else messages)


def _row_system_prompt(
    row: dict[str, Any], messages: list[dict[str, str]], template: PromptTemplate | None, layout: ChatLayout
) -> dict[str, str] | None:
    """The system message a ShareGPT row gives beside its turns (its `system` field), if any.

    Exports often carry one per row (LLaMA-Factory's sharegpt column `system`, axolotl's default
    field); dropping it would train without the prompt the data was written under."""
    field = layout.system_field
    if field is None or row.get(field) is None:
        return None
    prompt = _string(row, field, required=False)
    if not prompt.strip():  # exports write "" for rows without one
        return None
    if messages[0]["role"] == "system":
        raise RowError(field, f"a system prompt here and in {layout.field}[0]: give it in one place")
    if problem := _no_system_slot(template):
        raise RowError(field, problem)
    return {"role": "system", "content": prompt}


def _no_system_slot(template: PromptTemplate | None) -> str | None:
    """Why a system message cannot be rendered by `template`; None when it can."""
    if template is None or template.system_prefix is not None:
        return None
    with_system = [t.name for t in BUILTIN_TEMPLATES.values() if t.system_prefix is not None]
    return (
        f"a system message, but template '{template.name}' has no place for one; leave it out, or use "
        f"a template with a system slot: {', '.join(with_system)} or model"
    )


def _chat_turn(turn: Any, where: str, layout: ChatLayout) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise RowError(
            where,
            f"must be an object with {layout.role_key} and {layout.content_key}, got {type(turn).__name__}",
        )
    if layout.role_key not in turn:
        # Named with the keys the turn has: role/content under "conversations" is the messages layout.
        keys = ", ".join(repr(str(key)) for key in turn)
        raise RowError(
            f"{where}.{layout.role_key}",
            f"missing; a turn has {layout.role_key} and {layout.content_key}, this one {keys or 'no keys'}",
        )
    name = turn[layout.role_key]
    if not isinstance(name, str) or name not in layout.roles:
        raise RowError(
            f"{where}.{layout.role_key}",
            f"{name!r} is not one of {', '.join(layout.roles)}{layout.unknown_role_hint}",
        )
    role = layout.roles[name]
    try:
        # An empty system message is harmless; an empty user or assistant turn is a data error.
        content = _string(turn, layout.content_key, required=role != "system")
    except RowError as e:
        raise RowError(f"{where}.{layout.content_key}", e.problem) from None
    if layout.only_role_and_content:
        for key in turn:
            if key not in (layout.role_key, layout.content_key):
                raise RowError(
                    f"{where}.{key}",
                    f"unexpected key; a message has only {layout.role_key} and {layout.content_key}",
                )
    return {"role": role, "content": content}


def _check_turn_order(
    messages: list[dict[str, str]], names: list[str], template: PromptTemplate | None, layout: ChatLayout
) -> None:
    """An optional system message, then user and assistant alternating, ending with an assistant turn.
    `names` are the role names as the row spells them, for the errors."""

    def spelled(role: str) -> str:  # 'gpt' or 'assistant', as the row may spell a role
        return " or ".join(repr(name) for name, mapped in layout.roles.items() if mapped == role)

    has_system = messages[0]["role"] == "system"
    # Caught here, by row: the chat template would raise while the data is tokenized, with no row.
    if has_system and (problem := _no_system_slot(template)):
        raise RowError(f"{layout.field}[0].{layout.role_key}", problem)
    first = 1 if has_system else 0
    for index in range(first, len(messages)):
        expected = "user" if (index - first) % 2 == 0 else "assistant"
        if messages[index]["role"] != expected:
            raise RowError(
                f"{layout.field}[{index}].{layout.role_key}",
                f"expected {spelled(expected)}, got {names[index]!r}: after an optional system message, "
                "turns alternate user, assistant",
            )
    if len(messages) == first or messages[-1]["role"] != "assistant":
        raise RowError(
            layout.field,
            f"must end with an assistant message ({layout.role_key} {spelled('assistant')}), the response "
            "to learn",
        )


@dataclass(frozen=True)
class RowFormat:
    """A data.format: how a row becomes an Example, and what the recipe must say for it."""

    name: str
    convert: Callable[[dict[str, Any], DataSection, PromptTemplate | None], Example]  # row, data, template
    # Rows split into a prompt and a response, so the loss can count the response alone; such rows
    # are rendered by a template (data.template).
    has_response: bool


FORMATS = {
    f.name: f
    for f in (
        RowFormat("text", lambda row, data, template: text_example(row, data.text_field), has_response=False),
        RowFormat(
            "instruction", lambda row, data, template: instruction_example(row, template), has_response=True
        ),
        RowFormat("messages", lambda row, data, template: messages_example(row, template), has_response=True),
        RowFormat(
            "sharegpt",
            lambda row, data, template: sharegpt_example(row, template, data.roles),
            has_response=True,
        ),
    )
}
# The formats whose rows have a prompt/response split (for the recipe's messages).
RESPONSE_FORMATS = [f.name for f in FORMATS.values() if f.has_response]


def row_format(name: str) -> RowFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; one of: {', '.join(FORMATS)}") from None
