"""Hermes tool calls read back from answers, whole and streamed, as vLLM's hermes parser reads them.

The chunks here are shaped as llama-cpp-python 0.3.36 streams a chat (the role, content deltas, an
empty delta with the finish_reason); tests/serving/backends/test_llamacpp.py runs the real server.
"""

from __future__ import annotations

import json

from serving import call_readers
from serving.hermes_calls import StreamedAnswer, parse

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "서울"}}\n</tool_call>'


def with_tool_calls(completion: dict) -> dict:
    return call_readers.with_tool_calls(completion, parse)


def stream_with_tool_calls(chunks: list[dict]):
    return call_readers.stream_with_tool_calls(iter(chunks), StreamedAnswer())


def functions(calls: list[dict]) -> list[tuple[str, dict]]:
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# --- whole answers -----------------------------------------------------------------------------


def test_an_answer_without_a_call_is_content_as_it_is():
    assert parse("It is sunny.") == ("It is sunny.", [])
    assert parse("") == ("", [])
    # Talking about tags is not calling.
    for text in ("Use <tool to call", "a <tool_cal> b", "</tool_call> alone", "<tool_call"):
        assert parse(text) == (text, [])


def test_a_call_and_the_text_before_it():
    assert functions(parse(WEATHER)[1]) == [("get_weather", {"city": "Seoul"})]
    assert parse(WEATHER)[0] is None  # no text before it: None, as vLLM answers
    content, calls = parse(f"Let me check.\n{WEATHER}\nDone.")
    assert content == "Let me check.\n" and functions(calls) == [("get_weather", {"city": "Seoul"})]


def test_two_calls_in_order_with_their_arguments_as_json_strings():
    content, calls = parse(f"{WEATHER}\n{TIME}")
    assert content is None
    assert functions(calls) == [("get_weather", {"city": "Seoul"}), ("get_time", {"zone": "서울"})]
    assert calls[1]["function"]["arguments"] == '{"zone": "서울"}'  # not \\uc11c\\uc6b8, as vLLM writes it


def test_a_call_the_answer_ends_inside_counts_once_its_json_is_whole():
    _, calls = parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}')
    assert functions(calls) == [("get_weather", {"city": "Seoul"})]
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"ci'
    assert parse(cut) == (cut, [])


def test_a_malformed_call_makes_the_whole_answer_content():
    for bad in (
        '<tool_call>\n{"name": "get_weather", "arguments": {city: Seoul}}\n</tool_call>',  # not JSON
        '<tool_call>\n{"arguments": {"city": "Seoul"}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "get_weather"}\n</tool_call>',  # no arguments
        '<tool_call>\n["get_weather"]\n</tool_call>',
        f"{WEATHER}\n<tool_call>\nnot json\n</tool_call>",  # one bad call spoils the others too
    ):
        text = f"Checking. {bad}"
        assert parse(text) == (text, []), bad


def completion(text: str, finish_reason: str = "stop") -> dict:
    """A chat completion as llama-cpp-python returns it."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


def test_a_completion_with_calls_gets_tool_calls_and_finish_reason_tool_calls():
    answer = with_tool_calls(completion(f"Sure. {WEATHER}"))
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure. "
    assert functions(choice["message"]["tool_calls"]) == [("get_weather", {"city": "Seoul"})]
    assert (answer["id"], answer["usage"]["total_tokens"], choice["message"]["role"]) == (
        "chatcmpl-1",
        8,
        "assistant",
    )
    for text in ("It is sunny.", "Use <tool_call> like this", None):
        assert with_tool_calls(completion(text)) == completion(text)


# --- streamed answers --------------------------------------------------------------------------


def chunks(pieces: list[str], finish_reason: str = "stop") -> list[dict]:
    """A chat stream as llama-cpp-python sends it (_convert_text_completion_chunks_to_chat)."""

    def chunk(delta: dict, finish: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {
            "id": "chatcmpl-1",
            "model": "m",
            "created": 1,
            "object": "chat.completion.chunk",
            "choices": [choice],
        }

    return [chunk({"role": "assistant"}), *(chunk({"content": p}) for p in pieces), chunk({}, finish_reason)]


def received(stream) -> tuple[list[str], list[dict], str]:
    """What an OpenAI client assembles from the stream: the content pieces, the calls, the finish_reason;
    checking on the way that each chunk is a valid one."""
    sent = list(stream)
    contents, calls = [], []
    assert sent[0]["choices"][0]["delta"] == {"role": "assistant"}
    for chunk in sent:
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == "chatcmpl-1"
        assert [c["index"] for c in chunk["choices"]] == [0]
        assert (chunk["choices"][0]["finish_reason"] is None) == (chunk is not sent[-1])
        delta = chunk["choices"][0]["delta"]
        if delta.get("content"):
            contents.append(delta["content"])
        for call in delta.get("tool_calls") or []:
            assert call["index"] == len(calls) and call["function"]["name"]
            calls.append({k: v for k, v in call.items() if k != "index"})
    assert sent[-1]["choices"][0]["delta"] == {}
    return contents, calls, sent[-1]["choices"][0]["finish_reason"]


def by_char(text: str) -> list[str]:
    return list(text)


def test_a_streamed_answer_without_calls_passes_through_as_it_came():
    text = "It is sunny in Seoul."
    assert received(stream_with_tool_calls(chunks([text]))) == ([text], [], "stop")
    assert received(stream_with_tool_calls(chunks(["a", "b"], "length"))) == (["a", "b"], [], "length")


def test_streamed_text_that_only_looks_like_a_tag_is_content_all_of_it():
    for text in ("Use <tool to call", "a <tool_cal> b <", "x <tool_call", "</tool_call> <tool_"):
        contents, calls, finish = received(stream_with_tool_calls(chunks(by_char(text))))
        assert ("".join(contents), calls, finish) == (text, [], "stop"), text
    # What cannot begin a tag is sent at once; "<tool" waits for the character that rules it out.
    answer = StreamedAnswer()
    assert [answer.feed(c) for c in "ab <tool "] == ["a", "b", " ", "", "", "", "", "", "<tool "]
    assert answer.finish() == ("", [])


def test_a_call_split_across_many_chunks_comes_whole_after_the_content_before_it():
    text = f"Let me check.\n{WEATHER}"
    contents, calls, finish = received(stream_with_tool_calls(chunks(by_char(text))))
    assert "".join(contents) == "Let me check.\n" and finish == "tool_calls"
    assert functions(calls) == [("get_weather", {"city": "Seoul"})]
    # The content is sent as it comes, before the call has ended.
    answer = StreamedAnswer()
    sent = [answer.feed(c) for c in by_char(text)]
    assert "".join(sent[: len("Let me check.\n")]) == "Let me check.\n"
    assert answer.finish()[0] == ""


def test_two_streamed_calls_come_in_one_delta_in_order():
    pieces = [WEATHER[:5], WEATHER[5:40], WEATHER[40:] + "\n<tool", TIME[5:]]
    contents, calls, finish = received(stream_with_tool_calls(chunks(pieces)))
    assert (contents, finish) == ([], "tool_calls")
    assert functions(calls) == [("get_weather", {"city": "Seoul"}), ("get_time", {"zone": "서울"})]


def test_a_streamed_malformed_call_is_content_to_the_last_character():
    text = 'Checking. <tool_call>\n{"name": "get_weather", "arguments": {city: Seoul}}\n</tool_call>'
    contents, calls, finish = received(stream_with_tool_calls(chunks(by_char(text))))
    assert ("".join(contents), calls, finish) == (text, [], "stop")
    cut = 'Checking. <tool_call>\n{"name": "get_weather", "argu'  # cut off by max_tokens
    contents, calls, finish = received(stream_with_tool_calls(chunks(by_char(cut), "length")))
    assert ("".join(contents), calls, finish) == (cut, [], "length")
