"""python -m serving with mistyped ports and URLs: a usage error or `error:` line naming the setting, before
any model loads or any request is sent."""

from __future__ import annotations

import pytest

from serving.cli import main


@pytest.mark.parametrize("port", ["99999", "-5", "http"])
def test_serve_refuses_a_port_out_of_range_before_loading(port, capsys):
    # It loaded the model, then bind() raised an OverflowError traceback.
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--backend", "local", "--run", "no-such-run", "--port", port])
    assert exit_.value.code == 2
    assert (
        f"argument --port: '{port}' (--port or SERVE_PORT) is not a port: give 0 .. 65535"
        in capsys.readouterr().err
    )


def test_a_bad_serve_port_in_the_environment_is_a_usage_error(monkeypatch, capsys):
    # int(SERVE_PORT) ran while the parser was built: a ValueError traceback for every command.
    monkeypatch.setenv("SERVE_PORT", "80a")
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--backend", "local", "--run", "no-such-run"])
    assert exit_.value.code == 2 and "'80a' (--port or SERVE_PORT) is not a port" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:abc", "Port could not be cast to integer value as 'abc'"),
        ("http://127.0.0.1:99999", "Port out of range 0-65535"),
    ],
)
def test_client_commands_name_a_url_with_a_bad_port(url, says, monkeypatch, capsys):
    # A port that is not a number was an httpx InvalidURL traceback; 99999 was "no server answered".
    monkeypatch.delenv("SERVE_URL", raising=False)
    assert main(["health", "--url", url]) == 2
    assert f"error: url '{url}' (--url, SERVE_URL or SERVE_PORT): {says}" in capsys.readouterr().err
    monkeypatch.setenv("SERVE_PORT", "abc")
    assert main(["chat", "hi"]) == 2
    assert "url 'http://127.0.0.1:abc' (--url, SERVE_URL or SERVE_PORT)" in capsys.readouterr().err
