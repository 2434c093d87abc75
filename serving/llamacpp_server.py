"""llama.cpp's server on a GGUF export, on this machine: `python -m serving serve --backend llamacpp`.

It runs llama-cpp-python's own server app (llama_cpp.server, the code behind `python -m
llama_cpp.server`) in this process, with the settings the other backends get: the run's
name as the model id, the recipe's max_length as the context, API_KEY, and 127.0.0.1 unless
told otherwise. The app is used as it is (serving.backends.llamacpp says how it differs), with two
wrappers around its model: requests held to the context limit (_hold_to_limit), and, for a chat
template that writes tool calls in a form read here (Hermes, Llama 3.1's JSON), those calls returned
as tool_calls (_parse_tool_calls). The compose service serve-llamacpp starts the same server with the
same settings as flags.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from serving import hermes_calls, llama3_calls
from serving.backends.llamacpp import DEFAULT_QUANT, GGUF_DIR, gguf_path
from serving.banner import ready_banner
from serving.call_readers import stream_with_tool_calls, with_tool_calls
from serving.errors import ServingError
from serving.listen import serve
from serving.model_dir import ModelDir, ModelDirError, read_json
from serving.tool_calls import renders_calls, template_parser

INSTALL_HINT = "pip install -e '.[export]' with the cached wheel: make venv-export"
# llama-cpp-python 0.3.36 (Llama._create_completion) never ends an answer inside a UTF-8 character:
# it generates up to 3 more tokens after max_tokens, but caps max_tokens at exactly what its context
# leaves after the prompt. An answer that ran to the context's end mid-character then had no room
# left in the KV cache ("decode: failed to find a memory slot", llama_decode returned 1): a 500, or a
# stream cut off and its connection left to be reset under the next request. So llama.cpp gets these
# 3 positions beyond the limit, and requests are held to the limit itself (_hold_to_limit).
UTF8_HEADROOM = 3


@dataclass(frozen=True)
class LlamaCppSettings:
    gguf: Path
    served_name: str
    n_ctx: int
    context_source: str
    threads: int | None = None  # llama.cpp's threads; None: its defaults (half the cores to generate)


def _gguf_context_length(path: Path) -> int | None:
    from gguf import GGUFReader  # the export extra, like llama_cpp itself

    fields = GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    field = fields.get(f"{arch}.context_length")
    return int(field.contents()) if field is not None else None


def settings_for(
    *,
    outputs: Path,
    run: str,
    quant: str = DEFAULT_QUANT,
    gguf: Path | None = None,
    served_name: str | None = None,
    max_model_len: int | None = None,
    threads: int | None = None,
) -> LlamaCppSettings:
    """The GGUF to serve and its context: the merged model's rule (the recipe's max_length) when
    its merged/ folder is beside gguf/, else the GGUF's own context length."""
    path = Path(gguf) if gguf else gguf_path(outputs, run, quant)
    if not path.is_file():
        raise ModelDirError(
            f"{path}: no such GGUF. Export the run first: make export FORMAT=gguf QUANT={quant} (RUN={run}), "
            "or pass --gguf FILE"
        )
    name, merged = exported_from(path)
    if merged is not None and merged.is_dir():
        n_ctx, source = ModelDir.open(merged).context_length(max_model_len)
    elif max_model_len:
        n_ctx, source = max_model_len, "set explicitly"
    else:
        found = _gguf_context_length(path)
        if found is None:
            raise ModelDirError(f"{path}: no context length in its metadata; pass --max-model-len")
        n_ctx, source = found, "the GGUF's context_length (no merged model beside it)"
    return LlamaCppSettings(path.resolve(), served_name or name, n_ctx, source, threads)


def exported_from(path: Path) -> tuple[str, Path | None]:
    """The model a GGUF export is of: its name (the default model id) and its merged model folder.
    `python -m training export` writes <name>-<quant>.gguf and <name>-<quant>.export.json into a gguf/
    folder beside the merged model: outputs/<name>/merged for a run, <name>/ for `export --merged
    <name>`. A GGUF from elsewhere is named after its file and has no merged model."""
    if path.parent.name != GGUF_DIR:
        return path.stem, None
    quant = (read_json(path.with_name(f"{path.stem}.export.json")) or {}).get("quant")
    folder = path.parent.parent
    if quant and path.stem.endswith(f"-{quant}"):
        name = path.stem.removesuffix(f"-{quant}")
    elif path.stem.startswith(f"{folder.name}-"):  # an export without its record: a run's, by its name
        name = folder.name
    else:
        return path.stem, None
    return name, folder / ("merged" if name == folder.name else name)


def build_app(settings: LlamaCppSettings, api_key: str | None = None):
    """llama-cpp-python's server app for the GGUF (loads the model)."""
    try:
        from llama_cpp.server import app as server_app
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise ServingError(
            f"the llama.cpp backend needs llama-cpp-python[server] ({e}): {INSTALL_HINT}"
        ) from None
    if os.environ.get("CONFIG_FILE"):
        raise ServingError(
            "CONFIG_FILE is set: llama-cpp-python's server would take its settings from that file instead "
            "of these; unset it"
        )
    # model_validate, not the constructor: pydantic-settings' constructor would also read every
    # setting from same-named environment variables (MODEL, PORT, N_CTX, CACHE, VERBOSE, ...).
    server = ServerSettings.model_validate({"api_key": api_key, "interrupt_requests": False})
    threads = {"n_threads": settings.threads, "n_threads_batch": settings.threads} if settings.threads else {}
    model = ModelSettings.model_validate(
        {
            "model": str(settings.gguf),
            "model_alias": settings.served_name,
            "n_ctx": settings.n_ctx + UTF8_HEADROOM,
            "verbose": False,
            **threads,
        }
    )
    app = create_app(server_settings=server, model_settings=[model])
    # create_app loaded the model into its module-level proxy (0.3.36); the proxy returns it.
    llama = server_app._llama_proxy()
    _hold_to_limit(llama, settings.n_ctx)
    reader = call_reader(llama.metadata.get("tokenizer.chat_template"))
    if reader is not None:
        _parse_tool_calls(llama, reader)
    return app


def _hold_to_limit(llama, limit: int) -> None:
    """Completions and chats (whose handlers call llama.create_completion too) as llama.cpp would
    answer them with an n_ctx of `limit`: the same refusal of a prompt that leaves no room, and
    max_tokens capped at what the limit leaves, so the UTF-8 headroom stays free."""
    from llama_cpp import StoppingCriteriaList

    create = llama.create_completion
    n_ctx = llama.n_ctx()
    # Where the headroom is not enough (a run of lead bytes that never completes a character, which
    # a random model can write), the answer ends there instead of failing.
    at_context_end = StoppingCriteriaList([lambda ids, _logits: len(ids) >= n_ctx])

    def create_completion(prompt, suffix=None, max_tokens=16, **kwargs):
        # Counted as /extras/tokenize/count and the completion count it: with BOS; token lists as given.
        n = (
            len(prompt)
            if isinstance(prompt, list)
            else len(llama.tokenize(prompt.encode("utf-8"), special=True))
        )
        if n >= limit:
            # The message llama-cpp-python's server turns into its 400 context_length_exceeded.
            raise ValueError(f"Requested tokens ({n}) exceed context window of {limit}")
        room = limit - n
        max_tokens = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
        guard = kwargs.pop("stopping_criteria", None)
        guard = StoppingCriteriaList([*(guard or []), *at_context_end])
        return create(prompt, suffix, max_tokens, stopping_criteria=guard, **kwargs)

    llama.create_completion = create_completion


# The tool_choice values with which the model decides whether to call, in the syntax it was trained
# to write, so its calls are parsed from the answer. vLLM 0.32 forces "required" to a JSON list of
# calls with its structured outputs; here the model is not forced (llama-cpp-python only renders the
# tools), but the calls it writes come back as tool_calls with finish_reason "tool_calls" as there.
# A tool_choice naming one function keeps llama-cpp-python's grammar, which forces that function's
# arguments as JSON and returns them as tool_calls itself; "none" keeps the answer as text.
PARSED_CHOICES = (None, "auto", "required")


# The forms of tool calls this server reads back, by the vLLM parser serving.tool_calls names for a
# template: each a module with parse(text) and a StreamedAnswer (serving.call_readers).
READERS = {"hermes": hermes_calls, "llama3_json": llama3_calls}
# How the banner names each form.
FORM_NAMES = {"hermes": "<tool_call> calls (Hermes form)", "llama3_json": "JSON calls (Llama 3.1's form)"}


def call_form(chat_template: str | None) -> str | None:
    """The form, among READERS, in which the template has the model write tool calls (rendered by
    llama.cpp's renderer, as the server renders requests); None for any other or none."""
    form = template_parser(chat_template, render_with_llama_cpp)
    return form if form in READERS else None


def call_reader(chat_template: str | None) -> ModuleType | None:
    """The reader module for the calls the template writes (serving.call_readers), or None."""
    form = call_form(chat_template)
    return READERS[form] if form else None


def _parse_tool_calls(llama, reader: ModuleType) -> None:
    """Chat answers with the model's calls returned as tool_calls, read by `reader` (the module of the
    template's form: serving.hermes_calls or serving.llama3_calls).

    Wrapped at the chat handler, the one place both of the server's paths go through: a plain request
    calls llama.create_chat_completion, a streamed one Llama.create_chat_completion unbound, and both
    call the handler that method picks (its chat_handler first)."""
    from llama_cpp import llama_chat_format

    handler = (
        llama.chat_handler
        or llama._chat_handlers.get(llama.chat_format)
        or llama_chat_format.get_chat_completion_handler(llama.chat_format)
    )

    def chat_handler(*, tools=None, tool_choice=None, stream=False, **kwargs):
        answer = handler(tools=tools, tool_choice=tool_choice, stream=stream, **kwargs)
        if not tools or tool_choice not in PARSED_CHOICES:
            return answer
        if stream:
            return stream_with_tool_calls(answer, reader.StreamedAnswer())
        return with_tool_calls(answer, reader.parse)

    llama.chat_handler = chat_handler


def run(
    settings: LlamaCppSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    serve(lambda: build_app(settings, api_key), host=host, port=port, on_ready=on_ready)


def render_with_llama_cpp(
    chat_template: str, messages: list[dict], tools: list[dict], add_generation_prompt: bool
) -> str:
    """A chat as llama-cpp-python's server renders it (Jinja2ChatFormatter, which passes `tools` to the
    template), for serving.tool_calls: the container image has no transformers."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        chat_template, eos_token="", bos_token="", add_generation_prompt=add_generation_prompt
    )
    return formatter(messages=messages, tools=tools).prompt


def tool_call_note(chat_template: str | None) -> str | None:
    """What the banner says of tool calls, for a GGUF whose chat template writes them.

    llama-cpp-python 0.3.36 renders a request's tools through the GGUF's template, so the model
    writes its calls as trained, but it parses none: with tool_choice "auto" a call would come back
    as text in content, finish_reason "stop". Calls in the Hermes form (Qwen2.5, Qwen3) and in Llama
    3.1's JSON form this server parses itself (_parse_tool_calls); calls in other forms (Qwen3-Coder's
    XML) still come back as text: for them only a tool_choice naming one function gives tool_calls,
    JSON its grammar forces from the first token, not the syntax the model was trained to write."""
    form = call_form(chat_template)
    if form is not None:
        return (
            f"tool calls: the model's {FORM_NAMES[form]} come back as tool_calls, finish_reason "
            f"tool_calls, as vLLM's {form} parser returns them (tool_choice auto or required)"
        )
    if not renders_calls(chat_template, render_with_llama_cpp):
        return None
    return (
        "tool calls: llama.cpp's server renders a request's tools but returns the model's calls as text in "
        "content (finish_reason stop), not as tool_calls: it reads back only the Hermes form's and Llama "
        "3.1's; vLLM and the local server return tool_calls (SERVE_BACKEND=vllm or local)"
    )


def served_chat_template() -> str | None:
    """The chat template in the GGUF llama-cpp-python's server has loaded (its tokenizer.chat_template)."""
    from llama_cpp.server import app as server_app

    return server_app._llama_proxy().metadata.get("tokenizer.chat_template")


def print_ready(settings: LlamaCppSettings, api_key: bool) -> Callable[[str], None]:
    def _print(url: str) -> None:
        note = tool_call_note(served_chat_template())
        banner = ready_banner(
            served_name=settings.served_name,
            path=settings.gguf,
            engine="llama.cpp (llama-cpp-python) on the CPU",
            url=url,
            limit=settings.n_ctx,
            limit_source=settings.context_source,
            api_key=api_key,
            details=[("note", note)] if note else (),
        )
        print(banner, flush=True)

    return _print
