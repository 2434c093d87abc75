"""Tool calls a model writes as text in its answer, returned as OpenAI `tool_calls`: what every form shares.

llama-cpp-python's server renders a request's tools through the GGUF's chat template, so a model
fine-tuned on tool calls writes them in its template's syntax, and returns them as text in content.
serving.llamacpp_server reads them back with the reader of the template's form, one module per form,
each named after the vLLM parser whose behaviour it follows (serving.tool_calls tells the form):

- serving.hermes_calls, vLLM's `hermes`: `<tool_call>{"name": ..., "arguments": ...}</tool_call>`;
- serving.llama3_calls, vLLM's `llama3_json`: a bare `{"name": ..., "parameters": ...}` as the answer.

A reader module gives `parse(text) -> (content, calls)` for a whole answer and a `StreamedAnswer` (a
subclass of the one here) for an answer arriving in pieces; this module puts the calls into
llama-cpp-python's chat completions and chunks, as OpenAI's clients expect them. Plain Python on plain
dicts: the llama.cpp image has llama-cpp-python, pydantic and this package, no transformers or torch.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# A form's whole-answer reader: (content, calls), the calls as OpenAI writes them in a message, none
# when the answer holds no call or a malformed one (then the content is the whole answer).
Parse = Callable[[str], tuple[str | None, list[dict]]]


def openai_call(name: str, arguments: object) -> dict:
    """One call as OpenAI writes it in a message: a fresh id, the arguments as a JSON string."""
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        # ensure_ascii=False as vLLM: "서울" stays readable in the arguments string.
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def with_tool_calls(completion: dict, parse: Parse) -> dict:
    """A chat completion (llama-cpp-python's dict) with the calls its answer writes as tool_calls."""
    choice = completion["choices"][0]
    content, calls = parse(choice["message"].get("content") or "")
    if not calls:
        return completion
    message = {**choice["message"], "content": content, "tool_calls": calls}
    return {**completion, "choices": [{**choice, "message": message, "finish_reason": "tool_calls"}]}


@dataclass
class StreamedAnswer(ABC):
    """An answer arriving in pieces: what of it can be sent as content now, and at its end the rest.

    Content is passed through as far as the form's `_split` allows; once it says a call has begun,
    everything is held to the end of the answer, and only then parsed, as a whole: a call is sent
    once, complete, never as fragments of arguments that a later malformed piece would turn back
    into text. A call costs the client its incremental arguments (vLLM streams those), which a tool
    call cannot use before it is complete anyway."""

    text: str = field(default="", init=False)
    sent: int = field(default=0, init=False)  # characters of `text` sent as content
    in_call: bool = field(default=False, init=False)  # a call has begun: all held to the end

    @staticmethod
    @abstractmethod
    def parse(text: str) -> tuple[str | None, list[dict]]:
        """The form's whole-answer reader."""

    @abstractmethod
    def _split(self) -> tuple[int, bool]:
        """For the answer so far (self.text): how much of it may be sent as content, and whether a
        call has begun (from there on everything is held)."""

    def feed(self, piece: str) -> str:
        """The content to send now for the next piece of the answer ("" while held)."""
        self.text += piece
        if self.in_call:
            return ""
        sendable, self.in_call = self._split()
        sendable = max(sendable, self.sent)
        out, self.sent = self.text[self.sent : sendable], sendable
        return out

    def held(self) -> str:
        """The text received and not sent (yet)."""
        return self.text[self.sent :]

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the answer: the content not sent yet, and the calls (none: it was all text)."""
        rest = self.held()
        self.sent = len(self.text)
        if not self.in_call:
            return rest, []
        _, calls = self.parse(self.text)
        # The content before the first call is out already; what follows the calls is dropped, as
        # vLLM drops it. Without calls (a malformed one), the held text is content after all.
        return ("", calls) if calls else (rest, [])


def stream_with_tool_calls(chunks: Iterator[dict], answer: StreamedAnswer) -> Iterator[dict]:
    """llama-cpp-python's chat completion chunks, with the calls the answer writes sent as tool_calls;
    `answer` is a new StreamedAnswer of the template's form.

    The chunks stay OpenAI's: the role first, content deltas, then (where the answer had calls) one
    delta carrying every call whole, and the last chunk with finish_reason "tool_calls". A content
    chunk held back entirely is left out (its logprobs with it)."""
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
    held = answer.held()
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
