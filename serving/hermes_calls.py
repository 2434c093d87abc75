"""Tool calls in the Hermes form, read back from an answer as vLLM's `hermes` parser reads them.

Qwen2.5, Qwen3 and Hermes 2 Pro templates (serving.tool_calls: "hermes") have the model write each
call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. llama-cpp-python's server
returns such an answer as text; serving.llamacpp_server reads it with `parse` and `StreamedAnswer`
here (serving.call_readers does the rest) so the calls come back as OpenAI `tool_calls`, as vLLM
(--tool-call-parser hermes) returns them. The facts followed are those of vLLM 0.32's parser
(vllm/tool_parsers/hermes_tool_parser.py):

- an answer without `<tool_call>` is content, unchanged;
- otherwise each `<tool_call>...</tool_call>` (or a last one the answer ends inside) must hold a JSON
  object with "name" and "arguments"; the calls are those objects, their arguments re-serialized as
  a JSON string, and the content is the text before the first `<tool_call>` (None when empty);
- if any call is not such JSON, the whole answer is content, with no calls: a malformed call is
  text, never an error;
- a chat completion with calls ends with finish_reason "tool_calls".
"""

from __future__ import annotations

import json
import re

from serving import call_readers
from serving.call_readers import openai_call

START = "<tool_call>"
END = "</tool_call>"
# A closed call, or one the answer ends inside (cut off, or its closing tag never written).
_CALL = re.compile(re.escape(START) + "(.*?)" + re.escape(END) + "|" + re.escape(START) + "(.*)", re.DOTALL)


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer: the calls as OpenAI writes them in a message, none when
    the answer holds no call or a malformed one (then the content is the whole answer)."""
    if START not in text:
        return text, []
    calls = []
    for closed, open_ended in _CALL.findall(text):
        call = _call(closed or open_ended)
        if call is None:
            return text, []
        calls.append(call)
    return text[: text.index(START)] or None, calls


def _call(body: str) -> dict | None:
    """One call's OpenAI form, or None where the body is not a call's JSON object."""
    try:
        written = json.loads(body)
    except ValueError:
        return None
    if (
        not isinstance(written, dict)
        or not isinstance(written.get("name"), str)
        or "arguments" not in written
    ):
        return None
    return openai_call(written["name"], written["arguments"])


def _partial_start(text: str) -> int:
    """How many characters at the end of `text` could be the beginning of START."""
    return next((n for n in range(min(len(text), len(START) - 1), 0, -1) if START.startswith(text[-n:])), 0)


class StreamedAnswer(call_readers.StreamedAnswer):
    """A Hermes answer arriving in pieces. Content is passed through as it comes, except a tail that
    could be the beginning of `<tool_call>`, held until the next piece says; from a `<tool_call>` on,
    everything is held to the end of the answer."""

    parse = staticmethod(parse)

    def _split(self) -> tuple[int, bool]:
        start = self.text.find(START, self.sent)
        if start >= 0:
            return start, True
        return len(self.text) - _partial_start(self.text), False
