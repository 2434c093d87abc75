"""serving.client against TGI's documented HTTP API, served by a real fake TGI on 127.0.0.1."""

from __future__ import annotations

import os
import threading

import pytest

from serving.client import ServingClient
from serving.errors import (
    AuthenticationError,
    InvalidParameterError,
    LimitExceededError,
    OverloadedError,
    RequestRejectedError,
    ServerError,
    UnknownAdapterWarning,
)
from serving.params import AUTO_MAX_NEW_TOKENS
from serving.transport import RetryPolicy
from tests.serving.backends.fake_tgi import MODEL_ID, FakeTGI

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, deadline=10)


@pytest.fixture
def tgi():
    server = FakeTGI()
    yield server
    server.stop()


@pytest.fixture
def client(tgi):
    with ServingClient(tgi.url, retry=FAST_RETRY) as c:
        yield c


def test_detects_tgi_and_reads_its_limits_from_info(client):
    info = client.info
    assert (info.backend, info.model) == ("tgi", MODEL_ID)
    assert (info.max_input_tokens, info.max_total_tokens, info.max_stop_sequences) == (255, 256, 4)


def test_offline_mode_does_not_block_the_client(client):
    # huggingface_hub's own session refuses every URL in offline mode; ours is not the Hub.
    from huggingface_hub import constants

    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.is_offline_mode()
    assert client.generate("東京は", max_new_tokens=2).text == "はい 東京"


def test_greedy_generate_sends_do_sample_false_and_no_sampling_knobs(client, tgi):
    result = client.generate("日本の 首都 は", max_new_tokens=3)
    params = tgi.seen("/")[-1].body["parameters"]
    assert params["do_sample"] is False and params["details"] is True
    assert not {"temperature", "top_p", "top_k"} & set(params)  # any of them turns sampling on in TGI
    assert (result.text, result.finish_reason, result.generated_tokens) == ("はい 東京 です", "length", 3)


def test_sampling_maps_top_p_one_to_unset(client, tgi):
    client.generate("x", max_new_tokens=8, temperature=0.7, top_p=1.0, top_k=20, seed=7)
    params = tgi.seen("/")[-1].body["parameters"]
    assert params["do_sample"] is True and params["temperature"] == 0.7 and params["top_k"] == 20
    assert "top_p" not in params  # TGI rejects top_p=1.0; it means "no nucleus sampling" anyway
    client.generate("x", max_new_tokens=8, temperature=0.7, top_p=0.9)
    assert tgi.seen("/")[-1].body["parameters"]["top_p"] == 0.9


def test_generate_details_end_of_sequence_is_stop(client):
    result = client.generate("x", max_new_tokens=50, seed=3, temperature=0.5)
    assert result.finish_reason == "stop" and result.generated_tokens == 4 and result.seed == 3


def test_stream_yields_tokens_and_drops_the_special_eos_text(client):
    chunks = list(client.stream("x", max_new_tokens=50))
    assert "".join(c.text for c in chunks) == "はい 東京 です 。"
    assert all(c.tokens == 1 for c in chunks) and len(chunks) == 5
    assert (chunks[-1].finish_reason, chunks[-1].generated_tokens) == ("stop", 5)


def test_chat_uses_tgi_as_model_and_temperature_zero_for_greedy(client, tgi):
    result = client.chat("こんにちは", max_new_tokens=2)
    body = tgi.seen("/v1/chat/completions")[-1].body
    assert body["model"] == "tgi"  # any other name is taken as a LoRA adapter id
    assert body["temperature"] == 0 and body["messages"] == [{"role": "user", "content": "こんにちは"}]
    assert "top_p" not in body
    assert (result.text, result.finish_reason, result.generated_tokens) == ("はい 東京", "length", 2)


def test_chat_repetition_penalty_goes_through_presence_penalty(client, tgi):
    client.chat("x", max_new_tokens=2, repetition_penalty=1.2)
    assert tgi.seen("/v1/chat/completions")[-1].body["presence_penalty"] == pytest.approx(-0.8)


def test_chat_stream_collects_text_and_usage(client):
    chunks = list(client.chat_stream([{"role": "user", "content": "x"}], max_new_tokens=10))
    assert "".join(c.text for c in chunks) == "はい 東京 です 。"
    assert chunks[-1].generated_tokens == 4


def test_top_k_on_tgi_chat_is_refused_before_sending(client, tgi):
    with pytest.raises(InvalidParameterError, match="no top_k"):
        client.chat("x", temperature=0.5, top_k=5)
    assert not tgi.seen("/v1/chat/completions")


def test_too_many_stop_sequences_refused_with_the_servers_limit(client, tgi):
    with pytest.raises(InvalidParameterError, match="at most 4 stop sequences"):
        client.generate("x", stop=["a", "b", "c", "d", "e"])
    assert not tgi.seen("/")


def test_validation_error_json_becomes_request_rejected_with_server_message(tgi, client):
    tgi.queued.append(
        (
            422,
            {
                "error": "Input validation error: `temperature` must be strictly positive",
                "error_type": "validation",
            },
            {},
        )
    )
    with pytest.raises(RequestRejectedError) as caught:
        client.generate("x", max_new_tokens=2)
    err = caught.value
    assert (err.status, err.error_type) == (422, "validation")
    assert err.server_message == "Input validation error: `temperature` must be strictly positive"
    assert "TGI at http://127.0.0.1" in str(err) and "must be strictly positive" in str(err)


def test_generation_error_424_is_a_server_error(tgi, client):
    tgi.queued.append(
        (
            424,
            {"error": "Request failed during generation: CUDA out of memory", "error_type": "generation"},
            {},
        )
    )
    with pytest.raises(ServerError, match="CUDA out of memory") as caught:
        client.chat("x", max_new_tokens=2)
    assert caught.value.error_type == "generation"


def test_error_event_inside_a_stream_is_raised(tgi, client):
    tgi.stream_error = {"error": "Request failed during generation: boom", "error_type": "generation"}
    chunks = client.stream("x", max_new_tokens=3)
    with pytest.raises(ServerError, match="boom"):
        list(chunks)


def test_validation_error_event_after_200_is_a_request_error(client):
    # TGI validates streamed requests after answering 200, then sends an error event. The
    # client's own checks would refuse top_k=0, so the request is sent through its transport.
    response = client.transport.request(
        "POST", "/", json_body={"inputs": "x", "parameters": {"top_k": 0}, "stream": True}, stream=True
    )
    with pytest.raises(RequestRejectedError, match="top_k") as caught:
        list(client.transport.sse_lines(response))
    assert caught.value.error_type == "validation"


def test_overloaded_after_retries_is_an_overloaded_error(tgi, client):
    body = {"error": "Model is overloaded", "error_type": "overloaded"}
    tgi.queued.extend([(429, body, {})] * 5)
    with pytest.raises(OverloadedError, match="gave up after 3 attempts"):
        client.generate("x", max_new_tokens=2)
    assert len(tgi.seen("/")) == 3


def test_api_key_is_sent_and_hub_token_is_not(tgi, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_hub_token")
    tgi.api_key = "s3cret"
    with ServingClient(tgi.url, api_key="s3cret") as c:
        c.chat("x", max_new_tokens=1)
        c.generate("x", max_new_tokens=1)
    for seen in tgi.seen("/v1/chat/completions") + tgi.seen("/"):
        assert seen.headers["authorization"] == "Bearer s3cret"
    with ServingClient(tgi.url) as anonymous, pytest.raises(AuthenticationError, match="401.*API key"):
        anonymous.chat("x", max_new_tokens=1)
    assert "hf_secret" not in tgi.requests[-1].headers.get("authorization", "")


def test_unknown_adapter_id_warns_that_tgi_falls_back_to_the_base_model(tgi):
    with ServingClient(tgi.url, known_adapters=["quickstart"]) as c:
        with pytest.warns(UnknownAdapterWarning, match="base model"):
            c.chat("x", max_new_tokens=1, adapter_id="quikstart")
        assert tgi.seen("/v1/chat/completions")[-1].body["model"] == "quikstart"
        c.generate("x", max_new_tokens=1, adapter_id="quickstart")  # known: no warning
        assert tgi.seen("/")[-1].body["parameters"]["adapter_id"] == "quickstart"


def test_adapter_ids_come_from_lora_adapters(tgi, monkeypatch):
    monkeypatch.setenv("LORA_ADAPTERS", "quickstart=/outputs/quickstart/adapter,org/other@main")
    with ServingClient(tgi.url) as c:
        assert c.known_adapters == ("quickstart", "org/other@main")


def test_unverifiable_adapter_id_warns_once(tgi, monkeypatch):
    monkeypatch.delenv("LORA_ADAPTERS", raising=False)
    with ServingClient(tgi.url) as c, pytest.warns(UnknownAdapterWarning, match="cannot check") as record:
        c.chat("x", max_new_tokens=1, adapter_id="a")
        c.chat("x", max_new_tokens=1, adapter_id="a")
    assert len(record) == 1


def test_prompt_over_max_input_tokens_is_refused_before_generating(tgi, client):
    prompt = " ".join(["語"] * 300)  # 300 "tokens" for this server
    with pytest.raises(LimitExceededError, match="300 tokens.*at most 255 input tokens"):
        client.generate(prompt, max_new_tokens=4)
    assert tgi.seen("/tokenize") and not tgi.seen("/")


def test_prompt_plus_max_new_tokens_over_total_names_the_room_left(tgi, client):
    prompt = " ".join(["語"] * 200)
    with pytest.raises(LimitExceededError, match=r"lower max_new_tokens to 56"):
        client.generate(prompt, max_new_tokens=100)
    with pytest.raises(LimitExceededError, match="at most 255 new tokens"):
        client.chat("x", max_new_tokens=256)
    assert not tgi.seen("/") and not tgi.seen("/v1/chat/completions")
    assert client.generate(prompt, max_new_tokens=56).text


def test_long_chat_is_counted_with_chat_tokenize(tgi, client):
    with pytest.raises(LimitExceededError):
        client.chat(" ".join(["語"] * 400), max_new_tokens=4)
    assert tgi.seen("/chat_tokenize")[-1].body["messages"][0]["role"] == "user"


def test_no_length_given_means_what_the_context_leaves_after_the_prompt(tgi, client):
    prompt = " ".join(["語"] * 200)  # 200 "tokens" for this server, which takes 256 per request
    length = client.answer_length(prompt=prompt)
    assert (length.tokens, length.prompt_tokens, length.context, length.capped) == (56, 200, 256, False)
    assert (
        "56 new tokens: all that TGI's 256-token context leaves after the 200-token prompt"
        in length.describe()
    )
    client.generate(prompt)
    assert tgi.seen("/")[-1].body["parameters"]["max_new_tokens"] == 56
    chat = [{"role": "user", "content": " ".join(["語"] * 250)}]  # 250 "tokens" for /chat_tokenize
    client.chat(chat)
    assert tgi.seen("/v1/chat/completions")[-1].body["max_tokens"] == 6
    with pytest.raises(LimitExceededError, match="300 tokens.*at most 255 input tokens"):
        client.generate(" ".join(["語"] * 300))


def test_the_automatic_length_is_capped_where_the_context_is_larger():
    server = FakeTGI(max_input=8191, max_total=8192)
    try:
        with ServingClient(server.url) as c:
            length = c.answer_length(prompt="東京は")
            assert (length.tokens, length.capped) == (AUTO_MAX_NEW_TOKENS, True)
            assert "the most an answer gets unless max_new_tokens says otherwise" in length.describe()
            c.chat("東京は")
            c.generate("東京は", max_new_tokens=1000)  # a number is used as given
    finally:
        server.stop()
    assert server.seen("/v1/chat/completions")[-1].body["max_tokens"] == AUTO_MAX_NEW_TOKENS
    assert server.seen("/")[-1].body["parameters"]["max_new_tokens"] == 1000
    assert not server.seen("/tokenize")  # a short prompt clearly fits: nothing to count


# --- the fake follows TGI 3.3.7's router (fake_tgi.py names the source files) ---------------------


def rejected(client: ServingClient, body: dict, route: str = "/generate") -> str:
    """The validation message TGI answers `body` with, sent past the client's own checks."""
    with pytest.raises(RequestRejectedError) as caught:
        client.transport.post_json(route, body)
    assert (caught.value.status, caught.value.error_type) == (422, "validation")
    return caught.value.server_message


def test_parameters_are_checked_in_tgis_order_and_the_total_before_the_input_length(client):
    words = lambda n: " ".join(["語"] * n)  # noqa: E731
    # temperature is checked before top_p, and both before anything about the input.
    assert rejected(client, {"inputs": words(300), "parameters": {"temperature": 0, "top_p": 1.5}}) == (
        "Input validation error: `temperature` must be strictly positive"
    )
    # 300 input tokens over max_input_tokens 255: TGI reports the total (256) first.
    assert rejected(client, {"inputs": words(300), "parameters": {"max_new_tokens": 4}}) == (
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 256. "
        "Given: 300 `inputs` tokens and 4 `max_new_tokens`"
    )
    # Without max_new_tokens the default fills the room left (none here), so the input length fails.
    assert rejected(client, {"inputs": words(256), "parameters": {}}) == (
        "Input validation error: `inputs` must have less than 255 tokens. Given: 256"
    )
    assert rejected(client, {"inputs": "", "parameters": {"max_new_tokens": 1}}) == (
        "Input validation error: `inputs` cannot be empty"
    )


def test_max_new_tokens_defaults_to_the_room_left_and_is_validated_in_chunks_of_1024():
    tgi = FakeTGI(max_input=4000, max_total=4096)
    try:
        with ServingClient(tgi.url, check_limits=False) as c:
            # 10 + 5000 is over 4096, but TGI validates (and generates) at most 1024 new tokens at a time.
            c.transport.post_json("/generate", {"inputs": "a " * 10, "parameters": {"max_new_tokens": 5000}})
            assert rejected(c, {"inputs": "a " * 3500, "parameters": {"max_new_tokens": 5000}}) == (
                "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
                "Given: 3500 `inputs` tokens and 1024 `max_new_tokens`"
            )
    finally:
        tgi.stop()
    tgi = FakeTGI()  # 256 tokens in all: a 253-token prompt leaves room for 3 of the 4 reply words
    try:
        with ServingClient(tgi.url, check_limits=False) as c:
            out = c.transport.post_json("/generate", {"inputs": "a " * 253, "parameters": {"details": True}})
        assert (out["generated_text"], out["details"]["finish_reason"]) == ("はい 東京 です", "length")
    finally:
        tgi.stop()


def test_post_to_the_root_answers_a_list_as_compat_generate_does(client):
    answer = client.transport.post_json("/", {"inputs": "x", "parameters": {"max_new_tokens": 2}})
    assert answer == [{"generated_text": "はい 東京"}]


def test_health_is_503_until_tgi_is_ready_and_the_client_waits_for_it(tgi, client):
    tgi.ready = False
    with pytest.raises(ServerError) as caught:
        client.transport.request("GET", "/health", retry=RetryPolicy(max_attempts=1))
    assert caught.value.status == 503
    assert caught.value.server_message == "unhealthy" and caught.value.error_type == "healthcheck"
    assert client.health() is False
    threading.Timer(0.5, lambda: setattr(tgi, "ready", True)).start()
    assert client.wait_until_healthy(timeout=10, interval=0.1).backend == "tgi"


def test_a_chat_stream_reports_validation_errors_as_an_openai_error_event_then_done(client):
    body = {"model": "tgi", "messages": [{"role": "user", "content": "x"}], "temperature": -1, "stream": True}
    response = client.transport.request("POST", "/v1/chat/completions", json_body=body, stream=True)
    assert response.status_code == 200
    lines = [line for line in response.iter_lines() if line.strip()]
    assert lines == [
        'data:{"error": {"message": "Input validation error: `temperature` must be strictly positive", '
        '"http_status_code": 422}}',
        "data: [DONE]",
    ]
    response = client.transport.request("POST", "/v1/chat/completions", json_body=body, stream=True)
    with pytest.raises(RequestRejectedError, match="strictly positive") as caught:
        list(client.transport.sse_lines(response))
    assert caught.value.status == 422
    # Not streamed, the same error is the request's answer.
    assert rejected(client, {**body, "stream": False}, "/v1/chat/completions").endswith("strictly positive")
