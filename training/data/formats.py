"""Dataset row formats: check each row and turn it into an Example.

Formats (FORMATS, the one table a recipe's data.format is checked against):
- text: one field of raw text, trained on as a whole.
- instruction: instruction, optional input, output (Alpaca / Dolly style).
- messages: OpenAI-style chat turns [{"role": ..., "content": ...}, ...].
- sharegpt: ShareGPT chat turns {"conversations": [{"from": ..., "value": ...}, ...]}.

instruction and chat rows become chat turns, rendered later by the recipe's template. Chat rows
may hold tool calls (training.data.tool_calls), which only the base model's own template renders.
A malformed row raises RowError naming the field; the caller adds the row's location and
applies the recipe's bad-row policy. A new format is one converter and one entry in FORMATS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from training.data.example import Example
from training.data.row_errors import MissingField, RowError, TemplateMismatch
from training.data.templates import BUILTIN_TEMPLATES, PromptTemplate
from training.data.tool_calls import (
    TOOL_TEMPLATE_HINT,
    openai_tool_calls,
    parse_tools,
    sharegpt_tool_calls,
    tool_reply_keys,
)

if TYPE_CHECKING:  # the recipe names the data layer's types; data does not depend on it
    from training.recipe import DataSection

__all__ = ["Example", "MissingField", "RowError", "TemplateMismatch"]  # the row errors, for callers

ROLES = ("system", "user", "assistant")  # what data.roles may map a speaker name to

# ShareGPT speaker names: LLaMA-Factory's defaults (human, gpt, system; observation for a tool's
# result) and those axolotl's chat_template also takes (user, assistant, tool). Any other name maps
# through data.roles. LLaMA-Factory's function_call is an assistant turn whose value is the calls
# rather than text (ChatLayout.call_speakers).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


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
    roles: Mapping[str, str]  # role name in the row -> system, user, assistant or tool
    # The keys a turn may have besides role and content, by role; any other is refused. None:
    # others are ignored. OpenAI messages have nothing more a template could use; ShareGPT exports
    # carry extra keys per turn (weight in SlimOrca and OpenHermes), which are ignored.
    other_keys: Mapping[str, tuple[str, ...]] | None
    unknown_role_hint: str = ""
    system_field: str | None = None  # a row's system prompt beside its turns
    calls_key: str | None = None  # an assistant turn's tool calls beside its content (OpenAI)
    call_speakers: frozenset[str] = frozenset()  # names of assistant turns whose value is the calls
    tools_field: str = "tools"  # the row's function schemas


MESSAGES = ChatLayout(
    "messages",
    "role",
    "content",
    {r: r for r in (*ROLES, "tool")},
    other_keys={"assistant": ("tool_calls",), "tool": ("tool_call_id", "name")},
    calls_key="tool_calls",
)
SHAREGPT = ChatLayout(
    "conversations",
    "from",
    "value",
    SHAREGPT_ROLES,
    other_keys=None,
    unknown_role_hint="; data.roles maps other names, e.g. {bot: assistant}",
    system_field="system",
    call_speakers=frozenset({"function_call"}),
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
    tools = parse_tools(row.get(layout.tools_field), layout.tools_field)
    tool_field = _first_tool_field(turns, messages, tools, layout)
    if tool_field is not None and template is not None:
        raise TemplateMismatch(
            tool_field,
            f"tool calls, tool results and tools need the base model's own chat template, and template "
            f"'{template.name}' has no place for them; {TOOL_TEMPLATE_HINT}",
        )
    system = _row_system_prompt(row, messages, template, layout)
    _check_turn_order(messages, [turn[layout.role_key] for turn in turns], template, layout)
    return Example(messages=[system, *messages] if system else messages, tools=tools, tool_field=tool_field)


def _first_tool_field(
    turns: list[dict], messages: list[dict[str, Any]], tools: list[dict] | None, layout: ChatLayout
) -> str | None:
    """Where the row first has a tool call, a tool result or tools, as the row spells it."""
    for i, (turn, message) in enumerate(zip(turns, messages, strict=True)):
        if message.get("tool_calls") and turn[layout.role_key] not in layout.call_speakers:
            return f"{layout.field}[{i}].{layout.calls_key}"
        if message.get("tool_calls") or message["role"] == "tool":
            return f"{layout.field}[{i}].{layout.role_key}"
    return layout.tools_field if tools else None


def _row_system_prompt(
    row: dict[str, Any], messages: list[dict[str, Any]], template: PromptTemplate | None, layout: ChatLayout
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


def _chat_turn(turn: Any, where: str, layout: ChatLayout) -> dict[str, Any]:
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
    content_field = f"{where}.{layout.content_key}"
    if name in layout.call_speakers:
        return {
            "role": role,
            "content": "",
            "tool_calls": sharegpt_tool_calls(turn.get(layout.content_key), content_field),
        }
    calls = None
    if role == "assistant" and layout.calls_key is not None:
        calls = openai_tool_calls(turn.get(layout.calls_key), f"{where}.{layout.calls_key}")
    try:
        # An empty system message is harmless, and an assistant turn that calls tools may say nothing;
        # an empty user, answer or tool turn is a data error.
        content = _string(turn, layout.content_key, required=role != "system" and not calls)
    except RowError as e:
        raise RowError(content_field, e.problem) from None
    if layout.other_keys is not None:
        allowed = (layout.role_key, layout.content_key, *layout.other_keys.get(role, ()))
        for key in turn:
            if key not in allowed:
                raise RowError(
                    f"{where}.{key}",
                    f"unexpected key; a message with role {name!r} has only {', '.join(allowed)}",
                )
    message: dict[str, Any] = {"role": role, "content": content}
    if calls:
        message["tool_calls"] = calls
    if role == "tool":
        message.update(tool_reply_keys(turn, where))
    return message


def _check_turn_order(
    messages: list[dict[str, Any]], names: list[str], template: PromptTemplate | None, layout: ChatLayout
) -> None:
    """An optional system message, then user and assistant alternating, ending with an assistant
    answer; an assistant turn that calls tools is followed by one or more tool turns (the results),
    then by an assistant turn again. `names` are the role names as the row spells them, for the errors."""

    def spelled(*roles: str) -> str:  # 'gpt' or 'assistant', as the row may spell a role
        return " or ".join(
            repr(name)
            for role in roles
            for name, mapped in layout.roles.items()
            if mapped == role and name not in layout.call_speakers
        )

    has_system = messages[0]["role"] == "system"
    # Caught here, by row: the chat template would raise while the data is tokenized, with no row.
    if has_system and (problem := _no_system_slot(template)):
        raise RowError(f"{layout.field}[0].{layout.role_key}", problem)
    first = 1 if has_system else 0
    alternate = "after an optional system message, turns alternate user, assistant"
    after_calls = (
        "an assistant turn that calls tools is followed by the tools' results, then an assistant turn"
    )
    expected, rule = ("user",), alternate
    for index in range(first, len(messages)):
        message = messages[index]
        if message["role"] not in expected:
            raise RowError(
                f"{layout.field}[{index}].{layout.role_key}",
                f"expected {spelled(*expected)}, got {names[index]!r}: {rule}",
            )
        if message.get("tool_calls") or message["role"] == "tool":
            expected = ("tool", "assistant") if message["role"] == "tool" else ("tool",)
            rule = after_calls
        else:
            expected = ("assistant",) if message["role"] == "user" else ("user",)
            rule = alternate
    if len(messages) == first or messages[-1]["role"] != "assistant":
        raise RowError(
            layout.field,
            f"must end with an assistant message ({layout.role_key} {spelled('assistant')}), the response "
            "to learn",
        )
    if messages[-1].get("tool_calls"):
        raise RowError(
            f"{layout.field}[{len(messages) - 1}]",
            "the row ends with tool calls; end it with the tools' results and the assistant's answer to them",
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
