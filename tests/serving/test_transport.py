"""Retries, deadlines, timeouts and error bodies, against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import random
import socket
import struct
import threading

import pytest

from serving.client import ServingClient
from serving.errors import (
    OverloadedError,
    RequestRejectedError,
    ServerError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from serving.transport import RetryPolicy, parse_error_body
from tests.serving.backends.fake_tgi import FakeTGI

OVERLOADED = {"error": "Model is overloaded", "error_type": "overloaded"}


@pytest.fixture
def tgi():
    server = FakeTGI()
    yield server
    server.stop()


def quick(**kw) -> RetryPolicy:
    return RetryPolicy(**{"max_attempts": 5, "base_delay": 0.01, "max_delay": 0.05, "deadline": 30, **kw})


def test_backoff_is_exponential_with_full_jitter_and_honours_retry_after():
    policy = RetryPolicy(base_delay=0.5, max_delay=8.0)
    rng = random.Random(0)
    for attempt, cap in enumerate([0.5, 1, 2, 4, 8, 8]):
        waits = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap * 0.9 and min(waits) < cap * 0.1  # spread over the whole range
    assert policy.delay(0, retry_after=3.0, rng=rng) >= 3.0
    assert policy.delay(0, retry_after=60.0, rng=rng) <= 8.0  # a server cannot park the client forever


@pytest.mark.parametrize("status", [429, 503])
def test_retries_until_the_server_accepts(tgi, status):
    k = 3
    tgi.queued.extend(
        [(status, OVERLOADED if status == 429 else {"error": "unhealthy", "error_type": "healthcheck"}, {})]
        * k
    )
    with ServingClient(tgi.url, retry=quick()) as client:
        assert client.generate("x", max_new_tokens=2).text == "はい 東京"
    assert len(tgi.seen("/")) == k + 1


def test_gives_up_after_max_attempts_with_the_last_answer(tgi):
    tgi.queued.extend([(429, OVERLOADED, {})] * 10)
    with (
        ServingClient(tgi.url, retry=quick(max_attempts=4)) as client,
        pytest.raises(OverloadedError) as caught,
    ):
        client.generate("x", max_new_tokens=2)
    assert len(tgi.seen("/")) == 4
    assert (
        "gave up after 4 attempts" in str(caught.value)
        and caught.value.server_message == "Model is overloaded"
    )


def test_overall_deadline_stops_retrying(tgi):
    # The server asks for 1 s; the deadline is 0.5 s: no second attempt is started.
    tgi.queued.extend([(429, OVERLOADED, {"retry-after": "1"})] * 10)
    policy = RetryPolicy(max_attempts=50, base_delay=0.01, max_delay=5, deadline=0.5)
    with (
        ServingClient(tgi.url, retry=policy) as client,
        pytest.raises(ServerTimeoutError, match="0.5 s deadline"),
    ):
        client.generate("x", max_new_tokens=2)
    assert len(tgi.seen("/")) == 1


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (500, {"error": "Incomplete generation", "error_type": "incomplete_generation"}, ServerError),
        (422, {"error": "Input validation error: bad", "error_type": "validation"}, RequestRejectedError),
    ],
)
def test_other_errors_are_not_retried(tgi, status, body, error):
    tgi.queued.extend([(status, body, {})] * 3)
    with ServingClient(tgi.url, retry=quick()) as client, pytest.raises(error):
        client.generate("x", max_new_tokens=2)
    assert len(tgi.seen("/")) == 1


def test_a_server_slower_than_the_timeout_gives_a_timeout_error(tgi):
    with ServingClient(tgi.url, timeout=0.3) as client:
        assert client.info.backend == "tgi"
        tgi.delay = 3.0
        with pytest.raises(ServerTimeoutError, match="did not answer within 0.3 s"):
            client.generate("x", max_new_tokens=2)


def test_a_timeout_the_caller_sets_holds_whatever_the_retry_deadline(tgi):
    # The deadline bounds retrying only: an answer 1 s away is waited for under a 0.5 s deadline,
    # as ServingClient(timeout=600) must wait past the default 120 s deadline.
    with ServingClient(tgi.url, timeout=10.0, retry=RetryPolicy(deadline=0.5)) as client:
        assert client.info.backend == "tgi"
        tgi.delay = 1.0
        assert client.generate("x", max_new_tokens=2).text == "はい 東京"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_gives_a_clear_unavailable_error():
    url = f"http://127.0.0.1:{_closed_port()}"
    with ServingClient(url) as client:
        assert client.health() is False
        with pytest.raises(
            ServerUnavailableError, match=r"no server answered at .*Is it running\? .*make serve"
        ):
            client.chat("x")
        with pytest.raises(ServerTimeoutError, match="no healthy server"):
            client.wait_until_healthy(timeout=0.3, interval=0.1)


def test_a_connection_reset_mid_request_says_the_server_closed_it_not_that_none_is_running():
    """llama.cpp's server did this when it failed while generating: the client must not send the
    user looking for a server that is running."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"

        def reset_each_request() -> None:
            for _ in range(2):  # the client may retry once on a fresh connection
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                conn.recv(65536)
                # Linger 0: close with a RST, as a reset connection arrives ("Connection reset by peer").
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

        server = threading.Thread(target=reset_each_request, daemon=True)
        server.start()
        with (
            ServingClient(url) as client,
            pytest.raises(ServerUnavailableError, match="closed the connection before answering") as e,
        ):
            client.transport.post_json("/v1/completions", {"prompt": "x"})
        assert "Is it running" not in str(e.value)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '{"error":"Input validation error: x","error_type":"validation"}',
            ("Input validation error: x", "validation"),
        ),
        (
            '{"error":{"message":"The model `a` does not exist.","type":"NotFoundError","param":"model","code":404}}',
            ("The model `a` does not exist.", "NotFoundError"),
        ),
        ('{"error":{"message":"bad template","http_status_code":422}}', ("bad template", None)),
        (
            "{\"detail\":\"Server is pinned to '/m'; requested 'x'.\"}",
            ("Server is pinned to '/m'; requested 'x'.", None),
        ),
        (
            '{"detail":[{"loc":["body","messages"],"msg":"Field required"}]}',
            ("messages: Field required", "validation"),
        ),
        ("Failed to deserialize the JSON body", ("Failed to deserialize the JSON body", None)),
        ("", (None, None)),
    ],
)
def test_error_bodies_of_every_backend(body, expected):
    assert parse_error_body(body) == expected


def test_a_stream_that_ends_without_finishing_the_answer_is_an_error_not_a_short_answer():
    """A server that fails while generating may close its stream cleanly (llama.cpp's did before its
    context fix): the answer so far must not pass for the whole one."""
    client = ServingClient("http://127.0.0.1:9")  # no request is sent: the stream is given
    cut = [
        'data: {"choices": [{"text": "Tok", "finish_reason": null}]}',
        'data: {"choices": [{"text": "yo"}]}',
    ]
    chunks = client._completion_chunks(iter(cut))
    assert next(chunks).text == "Tok" and next(chunks).text == "yo"
    with pytest.raises(ServerError, match="ended the stream before the answer was finished"):
        next(chunks)
    whole = [*cut, 'data: {"choices": [{"text": "", "finish_reason": "length"}]}']
    assert [c.finish_reason for c in client._completion_chunks(iter(whole))][-1] == "length"
    assert len(list(client._completion_chunks(iter([*cut, "data: [DONE]"])))) == 2
