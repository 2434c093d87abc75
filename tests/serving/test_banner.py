"""The URL a server's banner gives is one a client can use: not 0.0.0.0, and inside a container the
host's published address and port (SERVE_PUBLIC_URL, which compose sets), not the container's own."""

from __future__ import annotations

import json
import urllib.request

import pytest

from serving.banner import local_url, ready_banner

from .conftest import ServerProcess


def banner(**overrides) -> str:
    settings = dict(
        served_name="quickstart",
        path="/outputs/quickstart/merged",
        engine="transformers serve on the cpu",
        url="http://127.0.0.1:8080",
        limit=256,
        limit_source="the recipe",
        api_key=False,
    )
    return ready_banner(**{**settings, **overrides})


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8080"),
        ("::", "http://[::1]:8080"),
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("::1", "http://[::1]:8080"),
        ("192.0.2.5", "http://192.0.2.5:8080"),
    ],
)
def test_a_wildcard_address_is_shown_as_the_loopback(host, url):
    assert local_url(host, 8080) == url


def test_the_banner_gives_the_published_url_where_compose_sets_one(monkeypatch):
    monkeypatch.delenv("SERVE_PUBLIC_URL", raising=False)
    assert "URL     http://127.0.0.1:8080  (" in banner()
    monkeypatch.setenv("SERVE_PUBLIC_URL", "http://127.0.0.1:9000/")
    shown = banner(url="http://127.0.0.1:8080", api_key=True)
    assert "URL     http://127.0.0.1:9000  (" in shown and "8080" not in shown
    assert "curl -s http://127.0.0.1:9000/v1/chat/completions" in shown and "$API_KEY" in shown
    assert "(SERVE_URL=http://127.0.0.1:9000)" in shown
    # SERVE_BIND=0.0.0.0 publishes the port on all the host's addresses.
    monkeypatch.setenv("SERVE_PUBLIC_URL", "http://0.0.0.0:9000")
    assert "URL     http://127.0.0.1:9000  (" in banner()


def test_the_banner_lists_what_the_user_should_read_before_the_example():
    lines = banner(details=[("LoRA", "a, b: pick one"), ("note", "read me")]).splitlines()
    assert lines[0] == "Serving 'quickstart' (/outputs/quickstart/merged) with transformers serve on the cpu"
    assert lines[3:5] == ["  LoRA    a, b: pick one", "  note    read me"]
    assert lines[5].startswith("  try     curl") and lines[-1] == "Ctrl-C stops it."


def test_a_server_on_all_addresses_prints_a_url_that_answers(merged_model, monkeypatch):
    monkeypatch.delenv("SERVE_PUBLIC_URL", raising=False)
    # ServerProcess waits for "URL http://127.0.0.1:<port>" in the banner: it printed 0.0.0.0 before.
    server = ServerProcess(merged_model, "--backend", "local", "--host", "0.0.0.0")
    try:
        with urllib.request.urlopen(f"{server.url}/v1/models", timeout=30) as response:
            assert [m["id"] for m in json.load(response)["data"]] == [merged_model.parent.name]
    finally:
        assert server.stop() == 0
