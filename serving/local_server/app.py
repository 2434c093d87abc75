"""The local CPU server: a merged model served by `transformers serve`, under the run's name, on 127.0.0.1.

It runs transformers' own serving app (its model manager, chat and completion handlers and
FastAPI routes, the code behind the `transformers serve` command) in this process, pinned
to the merged directory, behind `OpenAIFront`, which gives it the served name, limits and
API key that the GPU servers have. No GPU, Docker or model hub needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoTokenizer, GenerationConfig
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.server import build_server
from transformers.cli.serving.utils import GenerationState, get_response_template

from serving import mkl_vml
from serving.banner import ready_banner
from serving.listen import serve
from serving.local_server.front import OpenAIFront
from serving.model_dir import ModelDir, ModelDirError, read_chat_template
from serving.tool_calls import renders_calls


@dataclass(frozen=True)
class LocalServerSettings:
    model_dir: Path
    served_name: str
    max_model_len: int
    context_source: str
    device: str = "cpu"
    dtype: str = "auto"
    # torch's intra-op threads; None: torch's default (one per core). On a CPU shared with
    # other work, fewer threads than cores can be much faster: every op waits for all of them.
    threads: int | None = None
    notes: tuple[str, ...] = ()  # for the banner


def settings_for(
    model_dir: str | Path,
    *,
    served_name: str | None = None,
    max_model_len: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> LocalServerSettings:
    model = ModelDir.open(model_dir)
    if "@" in str(model.path.resolve()):
        # transformers serve reads "name@revision" from the model string.
        raise ModelDirError(
            f"{model.path}: transformers serve cannot load a path containing '@'; move the model"
        )
    length, source = model.context_length(max_model_len)
    note = tool_call_note(model)
    return LocalServerSettings(
        model_dir=model.path.resolve(),
        served_name=served_name or model.run_name,
        max_model_len=length,
        context_source=source,
        device=device,
        threads=threads,
        notes=(note,) if note else (),
    )


def tool_call_note(model: ModelDir) -> str | None:
    """What the banner says of tool calls, for a model whose chat template writes them.

    transformers serve renders a request's tools through the chat template, and returns the calls
    the model writes as `tool_calls` only where it has a response template to parse them with: the
    tokenizer's own (tokenizer_config.json's response_template), or one it keeps for a model type
    (Qwen2 and Qwen3, Qwen3.5, Gemma 4 in transformers 5.23). Without one the calls come back as
    text in `content`, which clients asking for tools would not look at."""
    if not renders_calls(read_chat_template(model.path)):
        return None
    # get_response_template reads only these two attributes of the tokenizer and the model.
    tokenizer = SimpleNamespace(response_template=model.tokenizer_config.get("response_template"))
    loaded = SimpleNamespace(config=SimpleNamespace(model_type=model.model_type))
    if get_response_template(tokenizer, loaded) is not None:
        return (
            "tool calls: requests may offer tools; transformers serve returns the model's calls as tool_calls"
        )
    return (
        f"tool calls: transformers serve cannot parse the calls this {model.model_type} model writes (no "
        "response template for it), so they come back as text in content; vLLM returns them as "
        "tool_calls (SERVE_BACKEND=vllm, or serve --backend vllm)"
    )


def build_app(settings: LocalServerSettings, api_key: str | None = None):
    """transformers' serving app for the pinned model, behind the OpenAI front. Loads the model."""

    if settings.threads:
        torch.set_num_threads(settings.threads)
    # Before the first request's forward pass, whose rotary cos would be torch's first multi-threaded
    # one in this process (serving/mkl_vml.py).
    mkl_vml.warm_up()
    path = str(settings.model_dir)
    manager = ModelManager(device=settings.device, dtype=settings.dtype, force_model=path)
    state = GenerationState()
    app = build_server(
        manager,
        ChatCompletionHandler(model_manager=manager, generation_state=state),
        completion_handler=CompletionHandler(model_manager=manager, generation_state=state),
        # The front answers 404 on these routes, so their handlers are never reached.
        response_handler=None,
        transcription_handler=None,
        systemone_handler=None,
        generation_state=state,
    )
    defaults = GenerationConfig.from_pretrained(path).to_diff_dict()
    defaults.pop("transformers_version", None)
    return OpenAIFront(
        app,
        served_name=settings.served_name,
        tokenizer=AutoTokenizer.from_pretrained(path),
        generation_defaults=defaults,
        max_model_len=settings.max_model_len,
        api_key=api_key,
    )


def run(
    settings: LocalServerSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until interrupted. `on_ready(url)` runs once the socket listens (port 0: any free port)."""

    # transformers logs every request at warning level, naming the model directory.
    for name in ("transformers.cli.serving.chat_completion", "transformers.cli.serving.completion"):
        logging.getLogger(name).addFilter(
            lambda record: not record.getMessage().startswith("[Request received]")
        )
    serve(lambda: build_app(settings, api_key), host=host, port=port, on_ready=on_ready)


def print_ready(settings: LocalServerSettings, api_key: bool) -> Callable[[str], None]:
    def _print(url: str) -> None:
        banner = ready_banner(
            served_name=settings.served_name,
            path=settings.model_dir,
            engine=f"transformers serve on the {settings.device}",
            url=url,
            limit=settings.max_model_len,
            limit_source=settings.context_source,
            api_key=api_key,
            details=[("note", note) for note in settings.notes],
        )
        print(banner, flush=True)

    return _print
