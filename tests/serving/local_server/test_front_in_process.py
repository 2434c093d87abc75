"""The local server run in this process (uvicorn on 127.0.0.1, in a thread), so a test can see inside it.

Two things need that: holding the server's own tokenizer mid-prompt, to show that its event
loop (and /health) is free meanwhile, and giving it a chat template with a bug, to show
that a failure of the server is a 500 with the traceback in its log, not a 400.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
import uvicorn
from transformers import AutoTokenizer

from serving.local_server.app import build_app, settings_for


class HeldTokenizer:
    """The server's tokenizer, held at its first call until the test lets it go on."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        self.released.wait(60)
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def served(merged_model):
    front = build_app(settings_for(merged_model))
    server = uvicorn.Server(uvicorn.Config(front, host="127.0.0.1", port=0, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", front
    server.should_exit = True
    thread.join(timeout=30)


def test_health_is_answered_while_a_prompt_is_being_tokenized(served):
    url, front = served
    held = HeldTokenizer(front.tokenizer)
    front.tokenizer = held
    try:
        with ThreadPoolExecutor(1) as pool:
            counting = pool.submit(httpx2.post, f"{url}/tokenize", json={"prompt": "日本の首都"}, timeout=120)
            assert held.entered.wait(60), "the tokenizer was never called"
            # The tokenizer is busy (held): an event loop running it could answer nothing now.
            assert httpx2.get(f"{url}/health", timeout=15).status_code == 200
            assert not counting.done()
            held.released.set()
            answer = counting.result()
        assert answer.status_code == 200
        assert answer.json()["tokens"] == held.tokenizer("日本の首都")["input_ids"]
    finally:
        held.released.set()
        front.tokenizer = held.tokenizer


@pytest.mark.parametrize(
    ("template", "error"),
    [
        (
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ (messages | length) / 0 }}{% endfor %}",
            "ZeroDivisionError",
        ),
        ("{% for m in messages %}{{ m.content }}{% endfor", "TemplateSyntaxError"),
    ],
)
def test_a_bug_in_the_servers_template_is_a_500_with_the_traceback_logged(
    served, merged_model, caplog, template, error
):
    url, front = served
    original = front.tokenizer
    broken = AutoTokenizer.from_pretrained(merged_model)
    broken.chat_template = template
    front.tokenizer = broken
    try:
        with caplog.at_level(logging.ERROR, logger="serving.local_server.front"):
            response = httpx2.post(
                f"{url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
                timeout=60,
            )
    finally:
        front.tokenizer = original
    assert response.status_code == 500, response.text
    body = response.json()["error"]
    assert body["type"] == "InternalServerError" and error in body["message"]
    assert "its log has the traceback" in body["message"]
    (record,) = [r for r in caplog.records if r.name == "serving.local_server.front"]
    assert record.exc_info is not None and record.exc_info[0].__name__ == error
    assert "POST /v1/chat/completions" in record.getMessage()
    # The server goes on answering.
    ok = httpx2.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200
