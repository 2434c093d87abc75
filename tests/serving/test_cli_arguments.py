"""python -m serving with mistyped ports and URLs: a usage error or `error:` line naming the setting, before
any model loads or any request is sent."""

from __future__ import annotations

import socket

import pytest

from serving.cli import main
from serving.errors import ServingError
from serving.listen import listening


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


def test_serve_on_a_port_in_use_stops_before_loading_the_model(merged_model, capsys):
    # The port is taken before the model loads: it was uvicorn's "address already in use" after loading,
    # with exit status 3.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        code = main(["serve", "--backend", "local", "--model-dir", str(merged_model), "--port", port])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: cannot listen on 127.0.0.1:{port}" in err and "another server is listening there" in err
    assert "Serving" not in err


def test_the_socket_is_bound_before_the_model_loads_and_released_after():
    with listening("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        in_use = rf"cannot listen on 127.0.0.1:{port} \(Address already in use\): .*--port, SERVE_PORT"
        with pytest.raises(ServingError, match=in_use), listening("127.0.0.1", port):
            pass
    with listening("127.0.0.1", port):  # free again
        pass
    # An address this machine does not have.
    not_here = r"cannot listen on 203\.0\.113\.7:0 \(Cannot assign requested address\)$"
    with pytest.raises(ServingError, match=not_here), listening("203.0.113.7", 0):
        pass


def test_a_cut_off_answer_blames_the_context_too_when_the_server_does_not_say_its_length():
    from serving.client import AUTO_MAX_NEW_TOKENS, AnswerLength

    # llama.cpp's server: 512 asked, 234 answered before its 256-token context ended.
    unknown = AnswerLength(AUTO_MAX_NEW_TOKENS, "llama.cpp").describe()
    assert unknown.startswith(f"{AUTO_MAX_NEW_TOKENS} new tokens or the end of llama.cpp's context")
    known = AnswerLength(AUTO_MAX_NEW_TOKENS, "vLLM", 4096).describe()
    assert "the most an answer gets unless max_new_tokens says otherwise" in known
