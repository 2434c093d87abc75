"""Llama 3.1's JSON tool calls read back from answers, whole and streamed, as vLLM's llama3_json parser
reads them.

The chunks are shaped as llama-cpp-python 0.3.36 streams a chat (tests/serving/test_hermes_calls.py
builds them); tests/serving/backends/test_llamacpp.py runs the real server on a trained model.
"""

from __future__ import annotations

from serving import call_readers
from serving.llama3_calls import StreamedAnswer, parse
from tests.serving.test_hermes_calls import by_char, chunks, completion, functions, received

WEATHER = '{"name": "get_weather", "parameters": {"city": "Seoul"}}'
TIME = '{"name": "get_time", "arguments": {"zone": "서울"}}'


def stream(pieces: list[str], finish_reason: str = "stop") -> tuple[list[str], list[tuple[str, dict]], str]:
    """What a client receives of an answer streamed in these pieces: the contents, calls, finish_reason."""
    sent = call_readers.stream_with_tool_calls(iter(chunks(pieces, finish_reason)), StreamedAnswer())
    contents, calls, finish = received(sent)
    return contents, functions(calls), finish


# --- whole answers -----------------------------------------------------------------------------


def test_a_call_with_parameters_or_arguments_and_no_content():
    content, calls = parse(WEATHER)
    assert content is None and functions(calls) == [("get_weather", {"city": "Seoul"})]
    assert calls[0]["function"]["arguments"] == '{"city": "Seoul"}'
    _, calls = parse(TIME)
    assert calls[0]["function"]["arguments"] == '{"zone": "서울"}'  # not \\uc11c\\uc6b8, as vLLM writes it
    # Both: "arguments" wins, as vLLM takes it.
    _, calls = parse('{"name": "f", "arguments": {"a": 1}, "parameters": {"b": 2}}')
    assert functions(calls) == [("f", {"a": 1})]


def test_python_tag_and_whitespace_before_the_call_are_not_content():
    for text in (f"<|python_tag|>{WEATHER}", f"\n {WEATHER}\n", f"<|python_tag|> {WEATHER}"):
        content, calls = parse(text)
        assert content is None and functions(calls) == [("get_weather", {"city": "Seoul"})], text


def test_two_calls_separated_by_a_semicolon_in_order():
    for text in (f"{WEATHER}; {TIME}", f"<|python_tag|>{WEATHER};{TIME}", f"{WEATHER}\n{TIME}"):
        content, calls = parse(text)
        assert content is None, text
        assert functions(calls) == [("get_weather", {"city": "Seoul"}), ("get_time", {"zone": "서울"})], text


def test_nested_arguments_are_one_call_and_text_after_the_calls_is_dropped():
    nested = '{"name": "book", "parameters": {"trip": {"from": "Seoul", "to": "Tokyo"}, "seats": [1, 2]}}'
    assert functions(parse(nested)[1]) == [
        ("book", {"trip": {"from": "Seoul", "to": "Tokyo"}, "seats": [1, 2]})
    ]
    content, calls = parse(f"{WEATHER} done.")  # vLLM drops it too
    assert content is None and functions(calls) == [("get_weather", {"city": "Seoul"})]


def test_an_answer_that_does_not_begin_with_a_brace_is_content_as_it_is():
    for text in (
        "It is sunny in Seoul.",
        "",
        "  ",
        "<|python_tag|>",
        "<|python_tag|>brave_search.call(query='Seoul')",  # a built-in tool's Python call: not JSON
        f"Let me check. {WEATHER}",  # a call after text: text (vLLM's streamed reading says so too)
        f"[{WEATHER}]",
    ):
        assert parse(text) == (text, []), text


def test_text_beginning_with_a_brace_that_is_no_call_is_content():
    for text in (
        '{"answer": "sunny"} is what the weather service says',  # JSON, but no name
        '{"name": "get_weather"}',  # no arguments nor parameters
        '{"name": 3, "parameters": {}}',  # a name that is no string
        "{sunny}",
        "{ is how a JSON object starts",
    ):
        assert parse(text) == (text, []), text


def test_a_malformed_or_cut_off_call_makes_the_whole_answer_content():
    for text in (
        '{"name": "get_weather", "parameters": {city: Seoul}}',  # not JSON
        '{"name": "get_weather", "parameters": {"city": "Seo',  # cut off by max_tokens
        f"{WEATHER}; {{not json}}",  # one bad call spoils the others too
        f'{WEATHER}; {{"city": "Seoul"}}',
    ):
        assert parse(text) == (text, []), text


def test_a_completion_with_calls_gets_tool_calls_and_finish_reason_tool_calls():
    answer = call_readers.with_tool_calls(completion(f"<|python_tag|>{WEATHER}"), parse)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert functions(choice["message"]["tool_calls"]) == [("get_weather", {"city": "Seoul"})]
    for text in ("It is sunny.", "{sunny}", None):
        assert call_readers.with_tool_calls(completion(text), parse) == completion(text)


# --- streamed answers --------------------------------------------------------------------------


def test_a_streamed_text_answer_passes_through_from_its_first_character():
    text = "It is sunny in Seoul. {not a call}"
    assert stream(by_char(text)) == (list(text), [], "stop")
    # Held only while it could still begin a call: whitespace and the beginning of <|python_tag|>.
    answer = StreamedAnswer()
    sent = [answer.feed(c) for c in ["\n", " ", "<|py", "thon", "!", "x"]]
    assert sent == ["", "", "", "", "\n <|python!", "x"]
    assert answer.finish() == ("", [])
    assert stream(["\n", "<|python_tag|>", "brave", "_search"]) == (
        ["\n<|python_tag|>brave", "_search"],
        [],
        "stop",
    )


def test_a_streamed_call_is_held_and_comes_whole_at_the_end():
    for pieces in (by_char(WEATHER), ["<|python_tag|>", WEATHER[:10], WEATHER[10:]], ["\n\n", WEATHER]):
        assert stream(pieces) == ([], [("get_weather", {"city": "Seoul"})], "tool_calls"), pieces
    answer = StreamedAnswer()
    assert {answer.feed(c) for c in WEATHER} == {""}


def test_two_streamed_calls_come_in_one_delta_in_order():
    text = f"{WEATHER}; {TIME}"
    assert stream([text[:30], text[30:60], text[60:]]) == (
        [],
        [("get_weather", {"city": "Seoul"}), ("get_time", {"zone": "서울"})],
        "tool_calls",
    )


def test_a_streamed_answer_beginning_with_a_brace_that_is_no_call_is_content_to_the_last_character():
    for text, finish in (
        ('{"answer": "sunny"} says the service', "stop"),
        ('{"name": "get_weather", "parameters": {city: Seoul}}', "stop"),
        ('{"name": "get_weather", "parameters": {"ci', "length"),  # cut off by max_tokens
    ):
        contents, calls, finished = stream(by_char(text), finish)
        assert ("".join(contents), calls, finished) == (text, [], finish), text


def test_a_stream_ending_without_its_finish_reason_still_sends_what_it_held():
    sent = list(call_readers.stream_with_tool_calls(iter(chunks(["  ", WEATHER])[:-1]), StreamedAnswer()))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in sent) == f"  {WEATHER}"
