"""Tool calls in Llama 3.1's JSON form, read back from an answer as vLLM's `llama3_json` parser reads them.

Llama 3.1 and 3.2 templates (serving.tool_calls: "llama3_json") have the model write a call as the
whole assistant turn: a bare JSON object, `{"name": "get_weather", "parameters": {"city": "Seoul"}}`,
sometimes after `<|python_tag|>`. llama-cpp-python's server returns such an answer as text;
serving.llamacpp_server reads it with `parse` and `StreamedAnswer` here (serving.call_readers does the
rest) so the calls come back as OpenAI `tool_calls`, as vLLM (--tool-call-parser llama3_json) returns
them. The facts followed are those of vLLM 0.32's parser (vllm/tool_parsers/llama_tool_parser.py):

- an answer is calls only where it begins with `{`, after `<|python_tag|>` if the model wrote it;
  any other answer is content, unchanged;
- from there, every `{` outside the objects already read must begin a JSON object with a string
  "name" and "arguments" or "parameters" (the template writes "parameters"; "arguments" wins where
  both are): the calls are those objects, their arguments re-serialized as a JSON string, and the
  content is None. What lies between and after them is dropped: `; ` between several calls, a stray
  word after the last;
- if any `{` does not begin such JSON (cut off, malformed, an object that is no call), the whole
  answer is content, with no calls: a malformed call is text, never an error;
- a chat completion with calls ends with finish_reason "tool_calls".

Two cheap departures, both where vLLM's own readings of a whole and a streamed answer disagree, taken
as its streamed one (which also decides from the answer's beginning) so that an answer comes back
the same either way: a call after text (`Sure: {"name": ...}`) is text, as the template never writes
one there and prose may quote JSON (vLLM's whole reading drops the text and returns the call); and
several calls may be separated by anything, not only `; ` (as its whole reading allows). Whitespace
before the call or after `<|python_tag|>` is allowed, as a chat template may leave some.
"""

from __future__ import annotations

import json

from serving import call_readers
from serving.call_readers import openai_call

PYTHON_TAG = "<|python_tag|>"
_JSON = json.JSONDecoder()
UNDECIDED = -1  # _call_start of an answer that may still begin a call or not


def _call_start(text: str) -> int | None:
    """Where the answer's first call begins (the index of its `{`), if the answer so far begins one:
    UNDECIDED while it still may (whitespace, or part of `<|python_tag|>`), None once it cannot."""
    head = text.lstrip()
    if head.startswith(PYTHON_TAG):
        head = head[len(PYTHON_TAG) :].lstrip()
    elif PYTHON_TAG.startswith(head):  # nothing but whitespace yet, or the tag's beginning
        return UNDECIDED
    if not head:
        return UNDECIDED
    return len(text) - len(head) if head.startswith("{") else None


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer: the calls as OpenAI writes them in a message, none when
    the answer is not a call or holds a malformed one (then the content is the whole answer)."""
    start = _call_start(text)
    if start is None or start == UNDECIDED:
        return text, []
    calls = []
    at = start
    while at >= 0:
        try:
            written, end = _JSON.raw_decode(text, at)
        except ValueError:
            return text, []
        call = _call(written)
        if call is None:
            return text, []
        calls.append(call)
        at = text.find("{", end)
    return None, calls


def _call(written: dict) -> dict | None:
    """One call's OpenAI form, or None where the JSON object is not a call."""
    if not isinstance(written.get("name"), str):
        return None
    if "arguments" in written:
        return openai_call(written["name"], written["arguments"])
    if "parameters" in written:
        return openai_call(written["name"], written["parameters"])
    return None


class StreamedAnswer(call_readers.StreamedAnswer):
    """A Llama 3.1 answer arriving in pieces. Its beginning is held only while it could still be a
    call's (whitespace, `<|python_tag|>`): then either all of it is content, passed through as it
    comes, or it begins with `{` and is held to the end, to be parsed once."""

    parse = staticmethod(parse)

    def _split(self) -> tuple[int, bool]:
        start = _call_start(self.text)
        if start is None:
            return len(self.text), False
        return 0, start != UNDECIDED
