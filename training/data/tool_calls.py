"""Tool (function) calls in chat rows: read them as the row spells them, and make sure the chat
template that trains on them renders them.

A row's tool calls become the messages transformers' chat templates take: an assistant message
with `tool_calls` [{"type": "function", "function": {"name", "arguments": {...}}}], `tool`
messages with the results, and the row's `tools` (function schemas) passed as `tools=`.
OpenAI rows (format messages) are nearly that already; LLaMA-Factory's ShareGPT rows spell a
call as a `function_call` turn whose value is JSON, and the schemas as a JSON string.

Only a template written for tools renders them, so the base model's own one (data.template:
model, e.g. Qwen2.5 or Qwen3) is checked once, by rendering a probe conversation, before any
row is tokenized; every tool row is checked again as it is rendered, so that a template that
drops a part in some rows (and not in the probe) cannot train on the rest as if it were whole.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from jinja2 import TemplateError

from training.data.example import Example
from training.data.row_errors import RowError
from training.errors import DataError

TOOL_TEMPLATE_HINT = (
    "use data.template: model with a base model whose chat template renders tool calls and their "
    "results (Qwen2.5, Qwen3, ...)"
)


def parse_tools(value: Any, field: str = "tools") -> list[dict] | None:
    """A row's function schemas as transformers takes them (`tools=`); None when the row has none.

    OpenAI writes a list of {"type": "function", "function": {...}}; LLaMA-Factory a JSON string of
    bare {"name", "description", "parameters"}, which is wrapped so that both render the same."""
    if isinstance(value, str):
        if not value.strip():  # exports write "" for rows without tools
            return None
        value = _json(value, field, "a JSON list of function schemas")
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise RowError(field, f"must be a list of function schemas, got {type(value).__name__}")
    return [_tool_schema(schema, f"{field}[{i}]") for i, schema in enumerate(value)]


def _tool_schema(schema: Any, where: str) -> dict:
    if not isinstance(schema, dict):
        raise RowError(where, f"must be a function schema object, got {type(schema).__name__}")
    if "function" in schema:
        _name(schema["function"], f"{where}.function")
        return schema
    _name(schema, where)
    return {"type": "function", "function": schema}


def openai_tool_calls(value: Any, field: str) -> list[dict] | None:
    """An assistant message's `tool_calls`, arguments parsed; None for null or [] (a plain answer)."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise RowError(field, f"must be a list of tool calls, got {type(value).__name__}")
    calls = []
    for i, call in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise RowError(where, f"must be an object with type and function, got {type(call).__name__}")
        if call.get("type", "function") != "function":
            raise RowError(f"{where}.type", f"{call['type']!r}: only 'function' calls are supported")
        if "function" not in call:
            raise RowError(
                f"{where}.function", "missing; a tool call is {type: function, function: {name, arguments}}"
            )
        normalized = _function_call(call["function"], f"{where}.function")
        if call.get("id") is not None:  # some templates (Mistral) pair results with calls by id
            normalized["id"] = _text(call["id"], f"{where}.id")
        calls.append(normalized)
    return calls


def sharegpt_tool_calls(value: Any, field: str) -> list[dict]:
    """LLaMA-Factory's function_call turn: JSON of {"name", "arguments"}, or a list for parallel calls."""
    if isinstance(value, str):
        value = _json(value, field, 'JSON of {"name": ..., "arguments": {...}} or a list of them')
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RowError(field, "is an empty list of calls")
    return [
        _function_call(call, f"{field}[{i}]" if isinstance(value, list) else field)
        for i, call in enumerate(calls)
    ]


def _function_call(function: Any, where: str) -> dict:
    if not isinstance(function, dict):
        raise RowError(
            where, f'must be an object {{"name": ..., "arguments": {{...}}}}, got {type(function).__name__}'
        )
    name = _name(function, where)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        # OpenAI sends arguments as a JSON string; templates that write `arguments | tojson` would
        # render that string quoted and escaped, a call no model should learn to make.
        arguments = _json(arguments, f"{where}.arguments", "a JSON object")
    if not isinstance(arguments, dict):
        raise RowError(
            f"{where}.arguments", f"must be an object (or its JSON), got {type(arguments).__name__}"
        )
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_reply_keys(turn: dict, where: str) -> dict[str, str]:
    """OpenAI's optional tool_call_id and name on a tool message, kept for templates that use them."""
    return {
        key: _text(turn[key], f"{where}.{key}")
        for key in ("tool_call_id", "name")
        if turn.get(key) is not None
    }


def _name(function: dict, where: str) -> str:
    if "name" not in function:
        raise RowError(f"{where}.name", "missing")
    name = function["name"]
    if not isinstance(name, str) or not name.strip():
        raise RowError(f"{where}.name", f"must be a non-empty string, got {name!r:.60}")
    return name


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RowError(where, f"must be a string, got {type(value).__name__}")
    return value


def _json(text: str, where: str, expected: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError(
            where, f"is not valid JSON ({e.msg} at character {e.pos}); expected {expected}"
        ) from None


# Probe names no real conversation contains, so finding one in a rendering means the template wrote it.
_PROBE_CALL = "probe_call_4d1e"
_PROBE_RESULT = "probe_result_9a7c"
_PROBE_TOOL = "probe_tool_2b6f"


def tool_template_problem(
    tokenizer, chat_template: str | None, *, completion_only: bool, with_tools: bool
) -> str | None:
    """Why `chat_template` (the one tokenizing the data) cannot train on tool rows; None when it can.

    TRL's supports_tool_calling judges the base model's own template (the one saved and served); a
    probe conversation then judges the training template (with completion-only loss, TRL's patched
    version of it, or the template itself read by rendering: training.data.chat_tokens): it must
    render the call, the result and, if rows have them, the tools; and count the call, but neither
    the result nor the tools, in the loss."""
    # Imported here: importing TRL takes seconds (torch, transformers), and the recipe's schema,
    # which every verb loads before its arguments are all checked, imports this module.
    from trl.chat_template_utils import supports_tool_calling

    from training.data.chat_tokens import tokenize_chats

    if not supports_tool_calling(tokenizer):
        return "the base model's chat template does not render tool calls and tool results"
    tools = [{"type": "function", "function": {"name": _PROBE_TOOL, "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [_call(_PROBE_CALL)]},
        {"role": "tool", "content": _PROBE_RESULT},
        {"role": "assistant", "content": "ok"},
    ]
    probe = Example(messages=messages, tools=tools if with_tools else None, where="a probe conversation")
    try:
        [ids], masks = tokenize_chats(
            tokenizer,
            [probe],
            tools=probe.tools,
            chat_template=chat_template,
            completion_only=completion_only,
        )
    except TemplateError as e:
        return f"the training chat template refuses a tool-calling conversation ({e})"
    except DataError as e:  # the responses cannot be found by rendering (training.data.chat_tokens)
        return f"the training chat template cannot mark the responses of a tool-calling conversation ({e})"
    text = tokenizer.decode(ids)
    if with_tools and _PROBE_TOOL not in text:
        return "the base model's chat template does not render the tools (the rows' tools field)"
    if not completion_only:
        return None
    counted = _masked_text(tokenizer, ids, masks[0])
    if _PROBE_CALL not in counted:
        return "the training chat template leaves the assistant's tool calls out of the loss"
    if _PROBE_RESULT in counted or _PROBE_TOOL in counted:
        return "the training chat template counts tool results or the tools in the loss"
    return None


def _call(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": {}}}


def _masked_text(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The loss tokens, decoded span by span (a span joined to the next would make up words)."""
    spans, span = [], []
    for token, counted in zip(ids, mask, strict=True):
        if counted:
            span.append(token)
        elif span:
            spans.append(tokenizer.decode(span))
            span = []
    if span:
        spans.append(tokenizer.decode(span))
    return "\n".join(spans)


def check_rendered(example: Example, text: str) -> None:
    """Every tool call, result and tool of the row must show in its rendering, or the row would
    train without it. Each part writes its string (a call its name, a result its content) at least
    once, raw or JSON-escaped where the template writes content with tojson (Llama 3.1), so the
    rendering must hold a string at least as often as the row's parts have it."""
    parts = [
        (call["function"]["name"], f"the tool call {call['function']['name']!r} of message {i}")
        for i, message in enumerate(example.messages)
        for call in message.get("tool_calls") or ()
    ]
    parts += [
        (message["content"].strip(), f"the tool result in message {i}")
        for i, message in enumerate(example.messages)
        if message["role"] == "tool"
    ]
    parts += [
        (t["function"]["name"], f"the tool {t['function']['name']!r} of the row's tools")
        for t in example.tools or ()
    ]
    needed = Counter(part for part, _ in parts)
    for part, what in parts:
        found = max(text.count(part), text.count(json.dumps(part, ensure_ascii=False)[1:-1]))
        if found >= needed[part]:
            continue
        if needed[part] > 1:  # which of the parts writing the same string went missing, no one can tell
            what = f"{what}, or of another of the {needed[part]} parts writing {part!r:.40}"
        raise DataError(
            f"{example.where}: the chat template renders nothing of {what}, so the row would train "
            f"without it; {TOOL_TEMPLATE_HINT}"
        )
