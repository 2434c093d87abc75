"""The local CPU server (transformers serve behind the OpenAI front) on the merged quickstart model, for real."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx2
import openai
import pytest
import torch
from huggingface_hub import InferenceClient, constants
from huggingface_hub.errors import HfHubHTTPError

from serving.cli import main
from serving.client import ServingClient
from serving.errors import AuthenticationError, LimitExceededError, NotFoundError, RequestRejectedError
from tests.conftest import ROOT
from tests.serving.conftest import API_KEY, ServerProcess
from training.data.templates import BUILTIN_TEMPLATES

INSTRUCTION = "日本で一番長い川は何ですか？"
QUICKSTART_PROMPT = "日本の首都はどこですか?"  # the README's `make chat PROMPT=...`
CONTEXT = "信濃川は長野県では千曲川と呼ばれています。"


def dolly_prompt(instruction: str, input_text: str = "") -> str:
    """The dolly-ja training format up to the answer, as the README documents it."""
    return f"ユーザー:{instruction}" + (f"\n入力:{input_text}" if input_text else "") + "\nシステム:"


def streamed(text: str) -> str:
    """Text as a stream shows it. A stream holds back the bytes of a character that is not
    finished yet, which a full decode shows as U+FFFD; the random tiny model often stops
    mid-character."""
    return text.replace("\ufffd", "").rstrip()


def greedy(reference, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    model, tokenizer = reference
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    new = out[0, len(ids) :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.fixture(scope="module")
def client(local_server):
    with ServingClient(local_server.url, api_key=API_KEY) as c:
        yield c


def test_models_lists_the_run_name_and_the_recipes_context_length(client):
    info = client.info
    assert (info.backend, info.model) == ("local", "quickstart")
    assert (info.max_total_tokens, info.max_input_tokens) == (256, 255)  # quickstart: data.max_length 256


def test_generate_returns_what_local_greedy_generation_returns(client, merged_reference):
    prompt = dolly_prompt(INSTRUCTION)
    expected, n = greedy(merged_reference, merged_reference[1](prompt)["input_ids"], 12)
    result = client.generate(prompt, max_new_tokens=12)
    assert result.text == expected
    assert (result.finish_reason, result.generated_tokens) == ("length" if n == 12 else "stop", n)


def test_stream_returns_the_same_text_piece_by_piece(client, merged_reference):
    prompt = dolly_prompt(INSTRUCTION)
    expected, n = greedy(merged_reference, merged_reference[1](prompt)["input_ids"], 12)
    chunks = list(client.stream(prompt, max_new_tokens=12))
    assert streamed("".join(c.text for c in chunks)) == streamed(expected)
    assert len([c for c in chunks if c.text]) > 1 and chunks[-1].generated_tokens == n


def test_chat_is_formatted_with_the_training_template(client, merged_reference):
    tokenizer = merged_reference[1]
    template = BUILTIN_TEMPLATES["dolly-ja"]
    messages = template.instruction_messages(INSTRUCTION, CONTEXT)  # what training made of this row
    trained_ids = tokenizer(dolly_prompt(INSTRUCTION, CONTEXT))["input_ids"]  # BOS + the documented format
    assert client.count_tokens(messages=messages) == len(trained_ids)
    served = client.transport.post_json("/tokenize", {"messages": messages})["tokens"]
    assert served == trained_ids

    expected, n = greedy(merged_reference, trained_ids, 10)
    result = client.chat(messages, max_new_tokens=10)
    assert (result.text, result.generated_tokens, result.prompt_tokens) == (expected, n, len(trained_ids))
    assert streamed("".join(c.text for c in client.chat_stream(messages, max_new_tokens=10))) == streamed(
        expected
    )


def test_the_openai_package_works_knowing_only_the_url(local_server, merged_reference):
    oai = openai.OpenAI(base_url=f"{local_server.url}/v1", api_key=API_KEY)
    model_id = oai.models.list().data[0].id
    assert model_id == "quickstart"
    expected, _ = greedy(merged_reference, merged_reference[1](dolly_prompt(INSTRUCTION))["input_ids"], 8)
    reply = oai.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": INSTRUCTION}], max_tokens=8, temperature=0
    )
    assert reply.model == "quickstart" and reply.choices[0].message.content == expected
    stream = oai.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": INSTRUCTION}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert streamed("".join(c.choices[0].delta.content or "" for c in stream if c.choices)) == streamed(
        expected
    )
    with pytest.raises(openai.NotFoundError, match="serves `quickstart`"):
        oai.chat.completions.create(
            model="/outputs/quickstart/merged", messages=[{"role": "user", "content": "x"}]
        )


def test_temperature_samples_and_a_seed_repeats(client):
    greedy_text = client.chat(INSTRUCTION, max_new_tokens=8).text
    sampled = [client.chat(INSTRUCTION, max_new_tokens=8, temperature=1.5, seed=s).text for s in range(3)]
    # transformers serve alone would decode greedily here: the model's generation_config says do_sample=false.
    assert any(text != greedy_text for text in sampled)
    assert client.chat(INSTRUCTION, max_new_tokens=8, temperature=1.5, seed=1).text == sampled[1]


def test_extra_sampling_fields_are_accepted(client):
    result = client.chat(
        INSTRUCTION, max_new_tokens=4, temperature=0.8, top_p=0.9, top_k=5, repetition_penalty=1.3, seed=0
    )
    assert result.generated_tokens == 4


def test_limits_are_refused_before_sending_and_enforced_by_the_server(client, local_server):
    with pytest.raises(LimitExceededError, match="at most 255 new tokens"):
        client.chat(INSTRUCTION, max_new_tokens=300)
    long_prompt = "川" * 400
    with pytest.raises(LimitExceededError, match=r"the prompt is \d+ tokens.*at most 255 input tokens"):
        client.generate(long_prompt, max_new_tokens=4)
    unchecked = ServingClient(local_server.url, api_key=API_KEY, check_limits=False)
    with (
        unchecked,
        pytest.raises(RequestRejectedError, match="maximum context length is 256 tokens") as caught,
    ):
        unchecked.generate(long_prompt, max_new_tokens=4)
    assert caught.value.status == 400


def test_a_4xx_carries_the_servers_message(client):
    with pytest.raises(RequestRejectedError) as caught:
        client.transport.post_json(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "foo": 1}
        )
    assert caught.value.status == 422 and "Unexpected fields" in caught.value.server_message
    with pytest.raises(RequestRejectedError, match=r"top_p must be in \(0, 1\], got 1.5") as caught:
        client.transport.post_json("/v1/completions", {"prompt": "x", "temperature": 1, "top_p": 1.5})
    assert (caught.value.status, caught.value.error_type) == (400, "BadRequestError")


def test_lm_evals_loglikelihood_request_is_refused_not_answered_without(client):
    # lm-eval's local-completions asks for the prompt's log-probabilities (logprobs + echo); an answer
    # without them would score every choice alike, so the server must refuse it.
    with pytest.raises(RequestRejectedError, match="returns no log-probabilities") as caught:
        client.transport.post_json(
            "/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": 1, "echo": True}
        )
    assert caught.value.status == 400
    client.transport.post_json("/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": None})


def test_unknown_model_and_hidden_admin_routes_are_404(client):
    with pytest.raises(NotFoundError, match="does not exist; this server serves `quickstart`"):
        client.transport.post_json("/v1/completions", {"model": "other", "prompt": "x"})
    with pytest.raises(NotFoundError, match="no route POST /reset"):
        client.transport.post_json("/reset", {})


def test_api_key_is_required_except_for_health(local_server):
    assert httpx2.get(f"{local_server.url}/health").status_code == 200
    # Every route but /health: no header, a wrong key, the right key in the wrong scheme.
    routes = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/tokenize")]
    routes.append(("GET", "/v1/models"))
    body = {
        "model": "quickstart",
        "messages": [{"role": "user", "content": "x"}],
        "prompt": "x",
        "max_tokens": 1,
    }
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        for method, path in routes:
            response = httpx2.request(method, f"{local_server.url}{path}", json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert "Authorization: Bearer" in response.json()["error"]["message"]
    authorized = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx2.get(f"{local_server.url}/v1/models", headers=authorized).status_code == 200
    with (
        ServingClient(local_server.url, api_key="wrong") as c,
        pytest.raises(AuthenticationError, match="401") as refused,
    ):
        c.chat("x", max_new_tokens=1)
    # The hint names only ways that exist: the chat CLI takes no --api-key (it would show in `ps`).
    assert "the API_KEY environment variable (or .env)" in str(refused.value)
    assert "--api-key" not in str(refused.value)


def test_cli_chat_prints_the_answer(local_server, merged_reference):
    expected, _ = greedy(merged_reference, merged_reference[1](dolly_prompt(INSTRUCTION))["input_ids"], 8)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "chat",
            INSTRUCTION,
            "--url",
            local_server.url,
            "--max-new-tokens",
            "8",
            "--no-stream",
        ],
        cwd=ROOT,
        env={**os.environ, "API_KEY": API_KEY},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"


def test_cli_health_and_errors(local_server, capsys, monkeypatch):

    monkeypatch.setenv("API_KEY", API_KEY)
    assert main(["health", "--url", local_server.url]) == 0
    assert "the local server serving 'quickstart' (256 tokens per request)" in capsys.readouterr().out
    assert main(["chat", "x", "--url", local_server.url, "--top-p", "1.5"]) == 2
    assert "error: top_p must be in (0, 1]" in capsys.readouterr().err


def test_the_quickstart_chat_fits_with_no_length_given(local_server, merged_reference):
    # `make chat PROMPT=...` right after `make serve`: the answer gets what the 256-token context leaves.
    ids = merged_reference[1](dolly_prompt(QUICKSTART_PROMPT))["input_ids"]
    room = 256 - len(ids)
    expected, n = greedy(merged_reference, ids, room)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "chat",
            QUICKSTART_PROMPT,
            "--url",
            local_server.url,
            "--no-stream",
        ],
        cwd=ROOT,
        env={**os.environ, "API_KEY": API_KEY},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"
    note = (
        f"[stopped at {room} new tokens: all that the local server's 256-token context leaves after the "
        f"{len(ids)}-token prompt]"
    )
    assert (note in done.stderr) == (n == room), done.stderr


def test_client_calls_with_no_length_get_what_the_context_leaves(client, merged_reference):
    prompt = dolly_prompt(INSTRUCTION)
    n = len(merged_reference[1](prompt)["input_ids"])
    length = client.answer_length(prompt=prompt)
    assert (length.tokens, length.prompt_tokens, length.context, length.capped) == (256 - n, n, 256, False)
    result = client.generate(prompt)
    assert result.finish_reason == "stop" or result.generated_tokens == 256 - n
    answer = client.chat(INSTRUCTION)
    assert answer.finish_reason == "stop" or answer.prompt_tokens + answer.generated_tokens == 256
    with pytest.raises(LimitExceededError, match=r"the prompt is \d+ tokens.*at most 255 input tokens"):
        client.chat("川" * 400)


def test_a_body_over_the_limit_is_413_and_the_server_stays_responsive(local_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for path, body in [
        ("/v1/completions", {"prompt": "川" * 2_000_000}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "川" * 2_000_000}]}),
        ("/tokenize", {"prompt": "a" * 2_000_000}),
    ]:
        response = httpx2.post(f"{local_server.url}{path}", json=body, headers=headers, timeout=60)
        assert response.status_code == 413, (path, response.text[:200])
        error = response.json()["error"]
        assert error["type"] == "PayloadTooLargeError"
        assert "this server reads at most 1048576 bytes" in error["message"]
        assert "256-token context" in error["message"]
    assert httpx2.get(f"{local_server.url}/health", timeout=10).status_code == 200
    with ServingClient(local_server.url, api_key=API_KEY, check_limits=False) as c:
        with pytest.raises(RequestRejectedError, match="at most 1048576 bytes") as caught:
            c.generate("川" * 400_000, max_new_tokens=1)
        assert caught.value.status == 413
        assert c.generate("川", max_new_tokens=1).generated_tokens == 1


def test_a_non_ascii_authorization_header_is_a_401(local_server):
    for value in ("Bearer ключ".encode(), b"Bearer \xff\xfe", f"Bearer {API_KEY}\u00e9".encode()):
        response = httpx2.post(
            f"{local_server.url}/v1/completions",
            json={"prompt": "x", "max_tokens": 1},
            headers={"Authorization": value},
            timeout=30,
        )
        assert response.status_code == 401, (value, response.text)
        assert response.json()["error"]["type"] == "AuthenticationError"


@pytest.mark.parametrize(
    ("route", "fields", "param", "message"),
    [
        (
            "/v1/chat/completions",
            {"n": 2},
            "n",
            "n=2 is not supported: the local server generates one choice",
        ),
        ("/v1/chat/completions", {"logprobs": True}, "logprobs", "returns no log-probabilities"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "returns no log-probabilities"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format", "to JSON"),
        ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty", "use repetition_penalty"),
        ("/v1/completions", {"n": 3}, "n", "n=3 is not supported"),
        ("/v1/completions", {"logprobs": 0}, "logprobs", "returns no log-probabilities"),
        ("/v1/completions", {"echo": True}, "echo", "does not echo the prompt"),
        ("/v1/completions", {"best_of": 2}, "best_of", "one sequence per request"),
    ],
)
def test_what_the_server_cannot_do_is_refused_not_ignored(client, route, fields, param, message):
    body = {"max_tokens": 2, **fields}
    body.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in route else {"prompt": "x"})
    with pytest.raises(RequestRejectedError, match=message) as caught:
        client.transport.post_json(route, body)
    assert (caught.value.status, caught.value.error_type) == (400, "BadRequestError")
    without = {k: v for k, v in body.items() if k != param}
    assert client.transport.post_json(route, without)["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"stop": 5}, "stop", "stop must be a non-empty string or a list of non-empty strings, got 5"),
        ({"stop": ["ok", 7]}, "stop", "got \\['ok', 7\\]"),
        ({"seed": "abc"}, "seed", "seed must be a whole number in \\[-2\\*\\*63, 2\\*\\*64\\), got 'abc'"),
        ({"seed": 2**64}, "seed", "seed must be a whole number"),
        (
            {"frequency_penalty": "x"},
            "frequency_penalty",
            "frequency_penalty must be a number in \\(-1, 2\\]",
        ),
        ({"frequency_penalty": -1.5}, "frequency_penalty", "repetition_penalty 1 \\+ frequency_penalty"),
        ({"logit_bias": "x"}, "logit_bias", "logit_bias must map token ids \\(0 .. 2047\\) to numbers"),
        ({"logit_bias": {"999999": -100}}, "logit_bias", "logit_bias must map token ids"),
        ({"tools": [5]}, "tools", "tools must be a list of tool definitions"),
        ({"generation_config": "notjson"}, "generation_config", "generation_config must be a string holding"),
        (
            {"generation_config": '{"temperature": -5}'},
            "temperature",
            "generation_config: temperature must be",
        ),
        ({"temperature": -1, "generation_config": "{}"}, "temperature", "temperature must be a number >= 0"),
    ],
)
def test_fields_transformers_would_fail_on_are_400s_naming_them(local_server, fields, param, message):
    # Each of these was a bare "Internal Server Error" (a TypeError or ValueError inside
    # transformers serve), or, with a generation_config of the request's own, not checked at all.
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **fields}
    response = httpx2.post(
        f"{local_server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("BadRequestError", param)
    assert re.search(message, error["message"]), error["message"]


def test_openais_own_forms_of_those_fields_are_answered(client):
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    # An empty stop list and integer biases (OpenAI's documentation writes {"1234": -100}) were 500s.
    for fields in ({"stop": []}, {"logit_bias": {"5": -100}}, {"seed": -1, "frequency_penalty": 0.5}):
        answer = client.transport.post_json("/v1/chat/completions", {**chat, **fields})
        assert answer["usage"]["completion_tokens"] == 2, fields
    raw = {"prompt": "x", "max_tokens": 2, "stop": ["\n\n"]}
    assert client.transport.post_json("/v1/completions", raw)["usage"]["completion_tokens"] >= 1


def test_neutral_values_of_those_fields_are_answered(client):
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    neutral = {
        "n": 1,
        "logprobs": False,
        "top_logprobs": 0,
        "presence_penalty": 0,
        "response_format": {"type": "text"},
    }
    assert (
        client.transport.post_json("/v1/chat/completions", {**chat, **neutral})["usage"]["completion_tokens"]
        == 2
    )
    raw = {"prompt": "x", "max_tokens": 2, "n": 1, "echo": False, "best_of": 1}
    assert client.transport.post_json("/v1/completions", raw)["usage"]["completion_tokens"] == 2


def test_content_parts_other_than_text_are_refused_and_text_parts_are_read(client, local_server):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts = [{"type": "text", "text": "日本の首都は"}, {"type": "text", "text": "どこですか"}]
    with pytest.raises(
        RequestRejectedError, match=r"messages\[0\]\.content\[2\] has type 'image_url'.*text only"
    ):
        client.chat([{"role": "user", "content": [*parts, image]}], max_new_tokens=1)
    # The openai package gets the same 400, not an answer to half the question.
    oai = openai.OpenAI(base_url=f"{local_server.url}/v1", api_key=API_KEY)
    with pytest.raises(openai.BadRequestError, match="has type 'image_url'"):
        oai.chat.completions.create(
            model="quickstart", messages=[{"role": "user", "content": [*parts, image]}], max_tokens=1
        )
    # Text parts are read as transformers serve reads them for a text model: joined with spaces.
    joined = client.transport.post_json("/tokenize", {"messages": [{"role": "user", "content": parts}]})
    spaced = client.transport.post_json(
        "/tokenize", {"messages": [{"role": "user", "content": "日本の首都は どこですか"}]}
    )
    assert joined["tokens"] == spaced["tokens"]
    answer = client.transport.post_json(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}], "max_tokens": 1}
    )
    assert answer["usage"]["prompt_tokens"] == joined["count"]


def test_only_the_templates_own_rejections_are_400s(client):
    with pytest.raises(
        RequestRejectedError,
        match="the chat template rejected the messages: The dolly-ja template has no place for a system message",
    ) as caught:
        client.chat([{"role": "system", "content": "s"}, {"role": "user", "content": "x"}], max_new_tokens=1)
    assert caught.value.status == 400
    # A chat_template_kwargs that would break the call itself is the client's error, said as such.
    with pytest.raises(RequestRejectedError, match="chat_template_kwargs must be an object") as caught:
        client.transport.post_json(
            "/tokenize",
            {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tokenize": False}},
        )


def test_inference_client_works_when_it_names_the_served_model(local_server, merged_reference, monkeypatch):
    # huggingface_hub's session refuses every URL under HF_HUB_OFFLINE=1, which the tests set.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub = InferenceClient(base_url=local_server.url, api_key=API_KEY)
    messages = [{"role": "user", "content": INSTRUCTION}]
    expected, _ = greedy(merged_reference, merged_reference[1](dolly_prompt(INSTRUCTION))["input_ids"], 6)
    out = hub.chat_completion(messages, model="quickstart", max_tokens=6, temperature=0)
    assert (out.model, out.choices[0].message.content) == ("quickstart", expected)
    # Without a model it sends `dummy`: a 404 (as vLLM answers) that says what to pass.
    with pytest.raises(HfHubHTTPError, match="pass model='quickstart' to chat_completion") as caught:
        hub.chat_completion(messages, max_tokens=6)
    assert caught.value.response.status_code == 404
    # text_generation posts to the URL itself, TGI's route: a 404 that names the routes to use.
    with pytest.raises(HfHubHTTPError, match="POST / is TGI's own route") as caught:
        hub.text_generation(dolly_prompt(INSTRUCTION), max_new_tokens=6)
    assert caught.value.response.status_code == 404


def test_sigterm_is_a_clean_stop_with_status_0(merged_model):
    # As `docker compose stop` ends it: uvicorn shuts down gracefully and the process exits 0, not
    # by the signal (143), which compose and supervisors would record as a failure.
    server = ServerProcess(merged_model, "--backend", "local")
    assert ServingClient(server.url).health()
    assert server.stop() == 0, "".join(server.output)[-2000:]
