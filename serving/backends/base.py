"""What every serving backend says about itself: one protocol, one module per server.

A backend module (serving/backends/<name>.py) defines one `Backend` subclass that knows
its server: how it is recognised at a URL, how it wants generation parameters, how a
request picks a model or adapter and counts tokens, and, for servers this project starts,
its image and the launch settings derived from a merged model, and, for a server this project
starts on the machine it runs on (`python -m serving serve`), whether it can run a given merged
model and the exact command that starts it. The client, `launch-env`, `serve`, the merge's
readiness check and the model card ask the backend instead of branching on its name. A new backend is one module here, registered in serving/backends/__init__.py,
plus its compose service and its .env.example lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from serving.errors import InvalidParameterError, ServingError
from serving.model_dir import ModelDir
from serving.params import SamplingParams, openai_chat_fields, openai_completion_fields

if TYPE_CHECKING:  # the HTTP transport is the client's; launch checks and the merge do not need it
    from serving.transport import Transport


# The two ways servers take a raw prompt (no chat template).
GENERATE_ROUTE = "/generate"  # TGI: text-generation-inference's own API, with token details
COMPLETIONS_ROUTE = "/v1/completions"  # OpenAI's completions API (vLLM, llama.cpp, the local server)


class LaunchError(ServingError):
    """A setting that would make the server fail to start or serve the wrong thing."""


@dataclass(frozen=True)
class ServerInfo:
    """What a server said about itself: which backend, its model id and per-request limits."""

    backend: str
    name: str  # the backend for people: "TGI", "vLLM", "the local server"
    url: str
    model: str
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_stop_sequences: int | None = None
    version: str | None = None
    adapters: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class LaunchSettings:
    """What compose interpolates to start a server on a merged model (`make serve`)."""

    backend: str
    run: str
    num_shard: int
    max_total_tokens: int
    max_input_tokens: int
    context_source: str
    dtype: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the person starting it should know
    # False where the server reads the same model and recipe itself (llama.cpp's, --max-model-len auto)
    # and no limit was set: checked here, not passed on, so that its banner names their source.
    limits_in_env: bool = True
    # vLLM: the parser of the tool calls the model writes (serving.tool_calls); None: tools are refused.
    tool_call_parser: str | None = None

    def env(self) -> dict[str, str]:
        env = {"RUN": self.run, "NUM_SHARD": str(self.num_shard)}
        if self.limits_in_env:
            env["MAX_INPUT_TOKENS"] = str(self.max_input_tokens)
            env["MAX_TOTAL_TOKENS"] = str(self.max_total_tokens)
        if self.dtype:
            env["DTYPE"] = self.dtype
        if self.backend == "vllm":
            # compose.yaml's vLLM command line is fixed, so both flags are always there: the switch
            # turned off (--no-enable-auto-tool-choice), vLLM never reads the parser's name.
            on = self.tool_call_parser is not None
            env["VLLM_TOOL_CHOICE"] = "enable-auto-tool-choice" if on else "no-enable-auto-tool-choice"
            env["TOOL_CALL_PARSER"] = self.tool_call_parser or "hermes"
        return env


@dataclass(frozen=True)
class LocalCommand:
    """A server process to start on this machine: its command line, the environment it adds, readiness."""

    argv: list[str]
    env: dict[str, str]
    ready_route: str = "/health"  # answers 200 once the server takes requests
    start_timeout: float = 900.0  # seconds to wait for that before giving up
    notes: list[str] = field(default_factory=list)  # what the person starting it should know


def check_num_shard(heads: int | None, kv_heads: int | None, num_shard: int, server: str, what: str) -> None:
    """Tensor parallelism splits the attention heads: both head counts must divide by the GPU count."""
    if num_shard < 1:
        raise LaunchError(f"NUM_SHARD must be >= 1 (the number of GPUs to shard over), got {num_shard}")
    if num_shard == 1 or heads is None:
        return
    bad = [
        f"{n} {name}"
        for n, name in ((heads, "attention heads"), (kv_heads, "key/value heads"))
        if n and n % num_shard
    ]
    if bad:
        ok = [n for n in range(1, num_shard + 1) if heads % n == 0 and (not kv_heads or kv_heads % n == 0)]
        raise LaunchError(
            f"{what}: {' and '.join(bad)} do not divide over {num_shard} GPUs, which {server}'s tensor "
            f"parallelism needs; set NUM_SHARD to one of {', '.join(map(str, ok))}"
        )


def split_limits(total: int, max_input: int | None) -> int:
    """MAX_INPUT_TOKENS for a MAX_TOTAL_TOKENS: as given (checked), or room for one new token."""
    if max_input is None:
        return total - 1  # TGI's own convention: any prompt that leaves room for one new token
    if not 0 < max_input < total:
        raise LaunchError(
            f"MAX_INPUT_TOKENS must be in [1, {total - 1}] (below MAX_TOTAL_TOKENS={total}), got {max_input}"
        )
    return max_input


class Backend:
    """The default behaviour is an OpenAI-compatible server; backends override what differs."""

    name: ClassVar[str]
    title: ClassVar[str]  # for people: "TGI", "vLLM"
    # The image compose runs for this backend (GPU servers); None where the project's own image serves.
    image: ClassVar[str | None] = None
    # Where the server describes itself (GET), if it has such a route (TGI: /info).
    info_route: ClassVar[str | None] = None
    # How /v1/models cards of this server say who serves the model (vLLM: "vllm").
    owned_by: ClassVar[str | None] = None
    # Where `generate`/`stream` send a raw prompt.
    raw_route: ClassVar[str] = COMPLETIONS_ROUTE
    # Where the server counts tokens (POST /tokenize, vLLM's shape), None where it cannot.
    tokenize_route: ClassVar[str | None] = None

    # --- recognition -------------------------------------------------------------------------

    def from_info(self, url: str, info: dict[str, Any]) -> ServerInfo | None:
        """This server's ServerInfo from the answer of its `info_route`, or None if the answer is not its own."""
        return None

    def from_models(self, url: str, listing: dict[str, Any], *, forced: bool = False) -> ServerInfo | None:
        """This server's ServerInfo from a GET /v1/models answer, or None if the cards are not its own."""
        cards = [c for c in listing.get("data") or [] if isinstance(c, dict) and c.get("id")]
        if not cards:
            raise ServingError(
                f"{url}/v1/models lists no model, so there is nothing to send requests to", url=url
            )
        bases = [c for c in cards if not c.get("parent")] or cards
        base = bases[0]
        if not forced and self.owned_by is not None and base.get("owned_by") != self.owned_by:
            return None
        length = base.get("max_model_len")
        length = length if isinstance(length, int) and length > 1 else None
        return ServerInfo(
            backend=self.name,
            name=self.title,
            url=url,
            model=str(base["id"]),
            max_input_tokens=length - 1 if length else None,
            max_total_tokens=length,
            adapters=tuple(str(c["id"]) for c in cards if c.get("parent")),
            raw=listing,
        )

    # --- requests ----------------------------------------------------------------------------

    def check_params(self, p: SamplingParams, api: str, info: ServerInfo) -> None:
        """Refuse what the target route cannot do, instead of letting it be ignored or rejected later."""

    def chat_fields(self, p: SamplingParams) -> dict:
        """Keyword arguments for InferenceClient.chat_completion."""
        return openai_chat_fields(p)

    def raw_fields(self, p: SamplingParams) -> dict:
        """The body fields of a raw-prompt request on `raw_route`."""
        return openai_completion_fields(p)

    def chat_model(self, model: str, adapter: str | None) -> str:
        """The `model` field of a chat request: the served model, or a served adapter."""
        return adapter or model

    def check_adapter(
        self, adapter: str, info: ServerInfo, known: Sequence[str] | None, url: str
    ) -> str | None:
        """Refuse an adapter the server does not serve; a warning where the server cannot tell."""
        if adapter not in info.adapters:
            served = ", ".join(info.adapters) or "none"
            raise InvalidParameterError(
                f"{self.title} at {url} serves one merged model and no adapter {adapter!r} (adapters: {served})"
            )

    def count_tokens(
        self, transport: Transport, info: ServerInfo, prompt: str | None, messages: list | None
    ) -> int | None:
        """Tokens of a prompt (or a chat, with its template), counted by the server; None if it cannot."""
        if self.tokenize_route is None:
            return None
        body = {
            "model": info.model,
            **({"messages": messages} if messages is not None else {"prompt": prompt}),
        }
        return int(transport.post_json(self.tokenize_route, body)["count"])

    # --- serving a merged model --------------------------------------------------------------

    def check_model(self, model: ModelDir, num_shard: int) -> list[str]:
        """Refuse (LaunchError) a model this server cannot load or shard; return warnings."""
        return []

    def plan_adapters(self, base_model: str, adapters: str, **limits) -> LaunchSettings:
        """Settings to serve LORA_BASE_MODEL with LORA_ADAPTERS, unmerged."""
        raise LaunchError(
            f"LORA_ADAPTERS is wired for TGI, not {self.title}; set SERVE_BACKEND=tgi, or serve the merged model"
        )

    def launch_dtype(self, model: ModelDir, env: dict[str, str], warnings: list[str]) -> str | None:
        """The DTYPE compose passes this server, from the model and the QUANTIZE/DTYPE settings."""
        if env.get("QUANTIZE"):
            raise LaunchError(
                f"QUANTIZE applies to TGI only; {self.title} reads the quantization of pre-quantized "
                "checkpoints from their config. Unset QUANTIZE, or serve with SERVE_BACKEND=tgi."
            )
        return None

    # --- starting the server on this machine (python -m serving serve) ----------------------

    def can_serve(self, model: ModelDir) -> str | None:
        """Why this server cannot run the merged model on this machine, in one line; None when it can."""
        return f"{self.title} is not started on this machine by `python -m serving serve`"

    def local_command(
        self,
        model: ModelDir,
        *,
        served_name: str,
        max_model_len: int,
        host: str,
        port: int,
        api_key: str | None,
        runtime_dir: Path,
        adapters: Sequence[tuple[str, Path]] = (),
    ) -> LocalCommand:
        """The command that serves `model` on host:port (scratch files under runtime_dir)."""
        raise LaunchError(self.can_serve(model) or f"{self.title} has no local command")
