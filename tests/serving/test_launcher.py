"""The vLLM launcher's supervision: a server asked to stop that does not is killed, not waited on forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from serving import launcher

# A server that never answers, ignores SIGTERM and has a child of its own: what vLLM 0.32 did when stopped
# while its engine process started (the engine process then outlived a SIGKILL to the server alone).
STUCK = (
    "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "engine = subprocess.Popen(['sleep', '120']); print(engine.pid, flush=True); time.sleep(120)"
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_server_stopped_while_starting_that_hangs_is_killed_with_its_children_after_the_stop_timeout(
    monkeypatch, capsys
):
    monkeypatch.setattr(launcher, "STARTING_STOP_TIMEOUT", 1.0)
    # As run_vllm_cpu starts vLLM: a session of its own.
    server = subprocess.Popen(
        [sys.executable, "-c", STUCK], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    engine = int(server.stdout.readline())  # its SIGTERM handler is in place
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C while it starts
    started = time.monotonic()
    code = launcher._supervise(server, "http://127.0.0.1:9", "/health", 60.0, None, [], drain_seconds=20)
    assert (
        time.monotonic() - started < 10
    )  # 0.5 s to the Ctrl-C, then the short timeout: no drain before it is up
    assert code == 0 and server.poll() == -signal.SIGKILL
    time.sleep(0.2)
    assert not alive(engine)  # the whole session went, not the server alone
    err = capsys.readouterr().err
    assert err == "Stopping vLLM before it is up\n"  # nothing in flight to wait for, no status to report


def test_a_server_that_never_answers_is_killed_with_its_children_at_the_start_timeout(capsys):
    server = subprocess.Popen(
        [sys.executable, "-c", STUCK], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    engine = int(server.stdout.readline())
    started = time.monotonic()
    code = launcher._supervise(server, "http://127.0.0.1:9", "/health", 1.0, None, [])
    assert time.monotonic() - started < 10  # it ignores SIGTERM: killed, not waited on
    assert code == 1 and server.poll() == -signal.SIGKILL
    time.sleep(0.2)
    assert not alive(engine)
    assert "error: vLLM did not answer /health within 1 s" in capsys.readouterr().err
