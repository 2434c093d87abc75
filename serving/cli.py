"""python -m serving <command>: serve, chat, generate, health, launch-env. The load benchmark: python -m serving.bench."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from serving import tool_calls
from serving.backends.base import LaunchError
from serving.backends.llamacpp import DEFAULT_QUANT
from serving.backends.tgi import CONTAINER_OUTPUTS, parse_lora_adapters
from serving.backends.vllm_cpu import lora_context_length
from serving.client import ServingClient
from serving.errors import ServingError
from serving.launch_env import LAUNCHED, plan_from_env, shell
from serving.launcher import BACKEND_CHOICES, banner, choose, run_vllm_cpu
from serving.model_dir import ModelDir
from serving.params import AUTO_MAX_NEW_TOKENS, SamplingParams


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=None, help="server URL (default: $SERVE_URL or http://127.0.0.1:$SERVE_PORT, 8080)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for an answer (default 120; retries of 429/503 never shorten it)",
    )
    parser.add_argument(
        "--model", default=None, help="model id to request (default: the one the server lists)"
    )
    parser.add_argument("--adapter", default=None, help="LoRA adapter id (TGI with LORA_ADAPTERS, vLLM LoRA)")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"most tokens to generate (default: what the server's context leaves after the prompt, "
        f"at most {AUTO_MAX_NEW_TOKENS})",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy decoding")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-stream", action="store_true", help="print the answer when it is complete")


# What `serve` runs here: vLLM on the CPU or the local server (auto picks), or llama.cpp on a GGUF export.
SERVE_BACKENDS = (*BACKEND_CHOICES, "llamacpp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve",
        help="serve a merged model on this machine's CPU: vLLM's engine when it can run it, else transformers "
        "serve; or its GGUF export with llama.cpp (--backend llamacpp)",
    )
    p.add_argument(
        "--backend",
        choices=SERVE_BACKENDS,
        default="auto",
        help="auto (default): vLLM on the CPU when it can run the model, else the local server (saying why); "
        "vllm: vLLM or an error; local: transformers serve on outputs/RUN/merged; llamacpp: llama.cpp on "
        "outputs/RUN/gguf/RUN-QUANT.gguf (make export FORMAT=gguf)",
    )
    p.add_argument(
        "--choose-backend",
        action="store_true",
        help="print the backend `auto` picks for this model and machine (vllm or local), the reason on stderr, and exit",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve this peft adapter too, as model NAME (vLLM; repeatable; --model-dir is then the base model). "
        "Default: LORA_ADAPTERS (name=dir,...) over LORA_BASE_MODEL",
    )
    p.add_argument(
        "--quant",
        default=os.environ.get("GGUF_QUANT") or DEFAULT_QUANT,
        help=f"llamacpp: which export to serve (default: $GGUF_QUANT or {DEFAULT_QUANT})",
    )
    p.add_argument(
        "--gguf", type=Path, default=None, help="llamacpp: a GGUF file (default: from --run and --quant)"
    )
    p.add_argument(
        "--run", default=os.environ.get("RUN") or "quickstart", help="run name (default: $RUN or quickstart)"
    )
    p.add_argument(
        "--outputs", type=Path, default=Path("outputs"), help="outputs directory (default: outputs)"
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a merged model directory (default: OUTPUTS/RUN/merged); llamacpp serves its run's gguf/ export",
    )
    p.add_argument("--name", default=None, help="the model id clients use (default: the run name)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--port",
        type=_port,
        # A string: argparse parses it with _port too, so a bad SERVE_PORT is a usage error, not a traceback.
        default=os.environ.get("SERVE_PORT") or "8080",
        help="port (0: any free one; default: $SERVE_PORT or 8080)",
    )
    p.add_argument(
        "--max-model-len",
        type=_max_model_len,
        default=None,
        help="tokens per request (default, or auto: the recipe's max_length)",
    )
    p.add_argument("--device", default="cpu", help="local: cpu (default), cuda, cuda:1, or auto")
    p.add_argument(
        "--tool-call-parser",
        default=os.environ.get("TOOL_CALL_PARSER") or tool_calls.AUTO,
        metavar="NAME",
        help="vLLM: how to read the tool calls the model writes, for requests that offer tools: auto "
        "(default, or $TOOL_CALL_PARSER): from its chat template (hermes for Qwen2.5/Qwen3, qwen3_coder "
        "for Qwen3.5, llama3_json for Llama 3.1/3.2); none; or one of vLLM's parser names",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (local: torch's default of one per core; llamacpp: llama.cpp's half the cores to "
        "generate; not vLLM)",
    )

    p = sub.add_parser("chat", help="send a chat message (formatted with the model's chat template)")
    p.add_argument("prompt")
    p.add_argument(
        "--system", default=None, help="a system message first (if the template has a place for it)"
    )
    _client_args(p)
    _sampling_args(p)

    p = sub.add_parser("generate", help="continue a raw prompt (no chat template)")
    p.add_argument("prompt")
    _client_args(p)
    _sampling_args(p)

    p = sub.add_parser("health", help="check the server; with --wait, wait until it is ready")
    p.add_argument("--url", default=None)
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait up to this long for it")

    p = sub.add_parser(
        "launch-env",
        help="TGI/vLLM/llama.cpp settings for compose, derived from the merged model (make serve)",
    )
    p.add_argument("--backend", choices=LAUNCHED, default=os.environ.get("SERVE_BACKEND") or "tgi")
    p.add_argument(
        "--num-shard", type=int, default=None, help="GPUs to shard over (default: $NUM_SHARD or all)"
    )
    p.add_argument(
        "--outputs", type=Path, default=None, help="outputs directory (default: /outputs in containers)"
    )
    return parser


def _max_model_len(value: str) -> int | None:
    """A token count, or auto for the default (compose passes ${MAX_TOTAL_TOKENS:-auto})."""
    if value == "auto":
        return None
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a positive number of tokens, or auto")
    return tokens


def _port(text: str) -> int:
    """--port, checked before the model loads: out of range it was an OverflowError traceback from bind()."""
    if not text.strip().isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} (--port or SERVE_PORT) is not a port: give 0 .. 65535 (0: any free one)"
        )
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except ServingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _serve(args: argparse.Namespace) -> int:
    api_key = os.environ.get("API_KEY") or None
    # The servers are loaded here, not at the top: their stacks (transformers serve, uvicorn,
    # llama-cpp-python) take seconds to import, which `chat` and `health` should not wait for.
    if args.backend == "llamacpp":
        from serving import llamacpp_server

        outputs, run = args.outputs, args.run
        if args.model_dir is not None:  # a run's merged/ folder: its GGUF exports sit beside it
            outputs, run = args.model_dir.parent.parent, args.model_dir.parent.name
        settings = llamacpp_server.settings_for(
            outputs=outputs,
            run=run,
            quant=args.quant,
            gguf=args.gguf,
            served_name=args.name,
            max_model_len=args.max_model_len,
            threads=args.threads,
        )
        _warn_if_open(args.host, api_key)
        print(f"Loading {settings.gguf} ...", file=sys.stderr, flush=True)
        llamacpp_server.run(
            settings,
            host=args.host,
            port=args.port,
            api_key=api_key,
            on_ready=llamacpp_server.print_ready(settings, bool(api_key)),
        )
        return 0
    adapters = _adapters(args.lora)
    base = os.environ.get("LORA_BASE_MODEL") if adapters and not args.lora else None
    model = ModelDir.open(args.model_dir or base or args.outputs / args.run / "merged")
    choice = choose(args.backend, model, adapters=adapters, installed=not args.choose_backend)
    if args.choose_backend:
        if choice.reason:
            print(f"vLLM cannot serve {model.path} on this machine: {choice.reason}", file=sys.stderr)
        print("vllm" if choice.backend == "vllm-cpu" else "local")
        return 0
    _warn_if_open(args.host, api_key)
    if choice.backend == "vllm-cpu":
        if args.threads or args.device != "cpu":
            print("warning: --threads and --device apply to the local server, not vLLM", file=sys.stderr)
        length, source = lora_context_length(model, adapters, args.max_model_len)
        name = args.name or (model.path.name if adapters else model.run_name)
        return run_vllm_cpu(
            model,
            served_name=name,
            max_model_len=length,
            host=args.host,
            port=args.port,
            api_key=api_key,
            adapters=adapters,
            tool_call_parser=args.tool_call_parser,
            on_ready=banner(model, name, length, source, adapters, api_key=bool(api_key)),
        )
    if choice.reason:
        print(
            f"vLLM cannot serve {model.path} on this machine: {choice.reason}; serving it with the local server",
            file=sys.stderr,
        )
    from serving.local_server.app import print_ready, run, settings_for

    settings = settings_for(
        model.path,
        served_name=args.name,
        max_model_len=args.max_model_len,
        device=args.device,
        threads=args.threads,
    )
    print(f"Loading {settings.model_dir} ...", file=sys.stderr, flush=True)
    run(
        settings,
        host=args.host,
        port=args.port,
        api_key=api_key,
        on_ready=print_ready(settings, bool(api_key)),
    )
    return 0


def _warn_if_open(host: str, api_key: str | None) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(
            f"warning: listening on {host} without API_KEY: anyone who can reach this port may use "
            "the model; publish it on 127.0.0.1 only (compose does), or set API_KEY",
            file=sys.stderr,
        )


def _adapters(given: list[str]) -> list[tuple[str, Path]]:
    """--lora NAME=DIR, or LORA_ADAPTERS (name=dir,...) when LORA_BASE_MODEL names the base."""
    spec = ",".join(given) or (os.environ.get("LORA_ADAPTERS") if os.environ.get("LORA_BASE_MODEL") else "")
    if not spec:
        return []
    adapters = []
    for name, path in parse_lora_adapters(spec):
        if path is None:
            raise LaunchError(f"adapter {name!r}: on the CPU, name a local adapter directory: {name}=DIR")
        adapters.append((name, Path(path)))
    return adapters


def _client(args: argparse.Namespace) -> ServingClient:
    return ServingClient(args.url, model=args.model, adapter_id=args.adapter, timeout=args.timeout)


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        seed=args.seed,
    )


def _generate(args: argparse.Namespace) -> int:
    params = _params(args)
    with _client(args) as client:
        chat = args.command == "chat"
        messages = None
        if chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}
            ]
        auto = None
        if params.max_new_tokens is None:  # chosen here, so that a cut-off answer can say why
            auto = client.answer_length(prompt=None if chat else args.prompt, messages=messages)
            params = dataclasses.replace(params, max_new_tokens=auto.tokens)
        if args.no_stream:
            result = client.chat(messages, params) if chat else client.generate(args.prompt, params)
            print(result.text)
            finish = result.finish_reason
        else:
            finish = None
            chunks = client.chat_stream(messages, params) if chat else client.stream(args.prompt, params)
            for chunk in chunks:
                print(chunk.text, end="", flush=True)
                finish = chunk.finish_reason or finish
            print()
        if finish == "length":
            limit = auto.describe() if auto else f"max_new_tokens={params.max_new_tokens}"
            print(f"[stopped at {limit}]", file=sys.stderr)
    return 0


def _health(args: argparse.Namespace) -> int:
    with ServingClient(args.url) as client:
        if args.wait > 0:
            info = client.wait_until_healthy(timeout=args.wait)
        elif not client.health():
            print(f"{client.url}: not healthy (no answer, or /health did not answer 200)", file=sys.stderr)
            return 1
        else:
            info = client.info
    limit = f"{info.max_total_tokens} tokens per request" if info.max_total_tokens else "limits unknown"
    print(f"{info.url}: {info.name} serving '{info.model}' ({limit})")
    return 0


def _launch_env(args: argparse.Namespace) -> int:
    outputs = args.outputs or (
        Path(CONTAINER_OUTPUTS) if Path(CONTAINER_OUTPUTS).is_dir() else Path("outputs")
    )
    settings = plan_from_env(args.backend, num_shard=args.num_shard, outputs=outputs, env=dict(os.environ))
    for warning in settings.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    where = "the CPU" if settings.backend == "llamacpp" else f"{settings.num_shard} GPU(s)"
    print(
        f"{settings.backend}: '{settings.run}' on {where}, {settings.max_total_tokens} tokens per "
        f"request (input up to {settings.max_input_tokens}), from {settings.context_source}",
        file=sys.stderr,
    )
    for note in settings.notes:
        print(note, file=sys.stderr)
    print(shell(settings))
    return 0


COMMANDS = {
    "serve": _serve,
    "chat": _generate,
    "generate": _generate,
    "health": _health,
    "launch-env": _launch_env,
}
