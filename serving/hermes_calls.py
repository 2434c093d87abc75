"""Tool calls in the Hermes form, read back from an answer as vLLM's `hermes` parser reads them.

Qwen2.5, Qwen3 and Hermes 2 Pro templates (serving.tool_calls: "hermes") have the model write each
call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. llama-cpp-python's server
returns such an answer as text; serving.llamacpp_server passes its chat completions through here so
they come back as OpenAI `tool_calls`, as vLLM (--tool-call-parser hermes) returns them. The facts
followed are those of vLLM 0.32's parser (vllm/tool_parsers/hermes_tool_parser.py):

- an answer without `<tool_call>` is content, unchanged;
- otherwise each `<tool_call>...</tool_call>` (or a last one the answer ends inside) must hold a JSON
  object with "name" and "arguments"; the calls are those objects, their arguments re-serialized as
  a JSON string, and the content is the text before the first `<tool_call>` (None when empty);
- if any call is not such JSON, the whole answer is content, with no calls: a malformed call is
  text, never an error;
- a chat completion with calls ends with finish_reason "tool_calls".

Plain Python on plain dicts: the llama.cpp image has llama-cpp-python, pydantic and this package,
no transformers or torch.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

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
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        # ensure_ascii=False as vLLM: "서울" stays readable in the arguments string.
        "function": {
            "name": written["name"],
            "arguments": json.dumps(written["arguments"], ensure_ascii=False),
        },
    }


def with_tool_calls(completion: dict) -> dict:
    """A chat completion (llama-cpp-python's dict) with the calls its answer writes as tool_calls."""
    choice = completion["choices"][0]
    content, calls = parse(choice["message"].get("content") or "")
    if not calls:
        return completion
    message = {**choice["message"], "content": content, "tool_calls": calls}
    return {**completion, "choices": [{**choice, "message": message, "finish_reason": "tool_calls"}]}


def _partial_start(text: str) -> int:
    """How many characters at the end of `text` could be the beginning of START."""
    return next((n for n in range(min(len(text), len(START) - 1), 0, -1) if START.startswith(text[-n:])), 0)


@dataclass
class StreamedAnswer:
    """An answer arriving in pieces: what of it can be sent as content now, and at its end the rest.

    Content is passed through as it comes, except a tail that could be the beginning of
    `<tool_call>`, held until the next piece says. From a `<tool_call>` on, everything is held to the
    end of the answer, and only then parsed, as a whole: a call is sent once, complete, never as
    fragments of arguments that a later malformed piece would turn back into text. A call costs the
    client its incremental arguments (vLLM streams those), which a tool call cannot use before it is
    complete anyway."""

    text: str = field(default="", init=False)
    sent: int = field(default=0, init=False)  # characters of `text` sent as content
    in_call: bool = field(default=False, init=False)  # a <tool_call> has begun: all held to the end

    def feed(self, piece: str) -> str:
        """The content to send now for the next piece of the answer ("" while held)."""
        self.text += piece
        if self.in_call:
            return ""
        start = self.text.find(START, self.sent)
        if start >= 0:
            self.in_call = True
            sendable = start
        else:
            sendable = len(self.text) - _partial_start(self.text)
        sendable = max(sendable, self.sent)
        out, self.sent = self.text[self.sent : sendable], sendable
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the answer: the content not sent yet, and the calls (none: it was all text)."""
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        if not self.in_call:
            return rest, []
        _, calls = parse(self.text)
        # The content before the first call is out already; what follows the calls is dropped, as
        # vLLM drops it. Without calls (a malformed one), the held text is content after all.
        return ("", calls) if calls else (rest, [])


def stream_with_tool_calls(chunks: Iterator[dict]) -> Iterator[dict]:
    """llama-cpp-python's chat completion chunks, with the calls the answer writes sent as tool_calls.

    The chunks stay OpenAI's: the role first, content deltas, then (where the answer had calls) one
    delta carrying every call whole, and the last chunk with finish_reason "tool_calls". A content
    chunk held back entirely is left out (its logprobs with it)."""
    answer = StreamedAnswer()
    chunk = None
    for chunk in chunks:
        choice = chunk["choices"][0]
        if choice.get("finish_reason") is not None:
            yield from _finish(answer, chunk)
            return
        delta = choice.get("delta") or {}
        if delta.get("content") is None:  # the role's chunk
            yield chunk
            continue
        content = answer.feed(delta["content"])
        if content:
            yield {**chunk, "choices": [{**choice, "delta": {**delta, "content": content}}]}
    held = answer.text[answer.sent :]
    if chunk is not None and held:  # a stream that ended without its finish_reason: the held text
        yield _with_delta(chunk, {"content": held})


def _finish(answer: StreamedAnswer, final: dict) -> Iterator[dict]:
    """The chunks that end the answer: held content or the calls, then `final` (the finish_reason)."""
    content, calls = answer.finish()
    if content:
        yield _with_delta(final, {"content": content})
    if calls:
        yield _with_delta(final, {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
        final = {**final, "choices": [{**final["choices"][0], "finish_reason": "tool_calls"}]}
    yield final


def _with_delta(chunk: dict, delta: dict) -> dict:
    """A chunk of the same answer as `chunk` (its id, model, created) with this delta and no finish_reason."""
    return {
        **chunk,
        "choices": [{**chunk["choices"][0], "delta": delta, "finish_reason": None, "logprobs": None}],
    }
