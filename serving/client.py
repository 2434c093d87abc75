"""One client for every backend: TGI, vLLM and the local CPU server.

Built on huggingface_hub's InferenceClient, TGI's recommended client (the old
`text-generation` package is legacy): `generate` and `stream` use TGI's /generate with
details, and `chat` uses the OpenAI-compatible /v1/chat/completions that all three
servers answer. vLLM and the local server have no /generate, so there `generate` and
`stream` use their /v1/completions, which takes a raw prompt the same way.

What the client adds: it finds out which server it talks to and that server's limits,
checks parameters and prompt length before sending, writes parameters the way each
backend needs them, retries 429 and 503 with backoff, and raises `serving.errors`
exceptions that carry the server's own message. InferenceClient's requests go through
the client's own HTTP transport (see serving.transport for why not the Hub session).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from huggingface_hub import InferenceClient

from serving.backends import BACKENDS, get_backend
from serving.backends.base import GENERATE_ROUTE, Backend, ServerInfo
from serving.backends.tgi import adapter_ids
from serving.errors import (
    InvalidParameterError,
    LimitExceededError,
    NotFoundError,
    ServerError,
    ServerTimeoutError,
    ServingError,
    UnknownAdapterWarning,
)
from serving.params import AUTO_MAX_NEW_TOKENS, SamplingParams
from serving.server_info import discover
from serving.transport import NO_RETRY, RetryPolicy, Transport

Messages = str | Sequence[dict[str, Any]]
# TGI's words for why generation stopped, in OpenAI's.
FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop"}
# Template tokens allowed per chat message when judging, without asking the server, that a
# chat clearly fits (a text token covers at least one byte). A template longer than this
# can let an oversized chat through to the server, which then refuses it itself.
CHAT_TEMPLATE_SLACK = 64


def default_url() -> str:
    return os.environ.get("SERVE_URL") or f"http://127.0.0.1:{os.environ.get('SERVE_PORT') or 8080}"


@dataclass(frozen=True)
class Completion:
    """A finished generation. finish_reason is "stop" (end of text or a stop sequence) or "length"."""

    text: str
    finish_reason: str | None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    seed: int | None = None
    raw: Any = dataclasses.field(default=None, repr=False)


@dataclass(frozen=True)
class Chunk:
    """A piece of a stream. `tokens` is how many tokens it holds, where the server says so."""

    text: str
    tokens: int | None = None
    finish_reason: str | None = None
    generated_tokens: int | None = None


@dataclass(frozen=True)
class AnswerLength:
    """The max_new_tokens the client chose for a request that left it unset, and why.

    tokens: what the server's context leaves after the prompt, at most AUTO_MAX_NEW_TOKENS.
    context: the server's tokens per request (None: it does not say); prompt_tokens: the
    prompt's, where they had to be counted to know.
    """

    tokens: int
    server: str
    context: int | None = None
    prompt_tokens: int | None = None

    @property
    def capped(self) -> bool:
        """True when the automatic maximum applied, not the room in the context."""
        return self.tokens == AUTO_MAX_NEW_TOKENS

    def describe(self) -> str:
        if self.capped and self.context is None:  # llama.cpp's server: its context may have come first
            return (
                f"{self.tokens} new tokens or the end of {self.server}'s context, whichever came first "
                f"({self.server} does not say how long its context is; --max-new-tokens N sets the first)"
            )
        if self.capped:
            return (
                f"{self.tokens} new tokens, the most an answer gets unless max_new_tokens says otherwise "
                "(--max-new-tokens N)"
            )
        prompt = f"the {self.prompt_tokens}-token prompt" if self.prompt_tokens is not None else "the prompt"
        return (
            f"{self.tokens} new tokens: all that {self.server}'s {self.context}-token context leaves "
            f"after {prompt}"
        )


def _finish(reason: Any) -> str | None:
    reason = getattr(reason, "value", reason)
    return FINISH_REASONS.get(reason, reason) if reason else None


def _messages(messages: Messages) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = [dict(m) for m in messages]
    if not out or any("role" not in m or "content" not in m for m in out):
        raise InvalidParameterError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    return out


def _prompt_bound(prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
    """More tokens than the prompt (or chat) can hold, judged without asking the server."""
    if messages is not None:
        text_bytes = sum(len(json.dumps(m.get("content"), ensure_ascii=False).encode()) for m in messages)
        return text_bytes + CHAT_TEMPLATE_SLACK * (len(messages) + 1)
    return len(prompt.encode()) + 8


class _HubClient(InferenceClient):
    """InferenceClient whose requests go through our transport (no Hub token, no offline block)."""

    def __init__(self, transport: Transport) -> None:
        super().__init__(base_url=transport.base_url)
        self._transport = transport

    def _inner_post(self, request_parameters, *, stream: bool = False):
        headers = {k: v for k, v in request_parameters.headers.items() if k.lower() != "authorization"}
        response = self._transport.request(
            "POST", request_parameters.url, json_body=request_parameters.json, headers=headers, stream=stream
        )
        return self._transport.sse_lines(response) if stream else response.content


class ServingClient:
    """Talk to a served model. Arguments default to SERVE_URL, API_KEY and LORA_ADAPTERS from the environment.

    model: the id to request (default: the one the server lists; TGI serves one model).
    adapter_id: a LoRA adapter to use on every request (TGI multi-LoRA, vLLM LoRA modules).
    known_adapters: the adapter ids TGI was started with, so an unknown id can be flagged.
    check_limits: refuse prompts and max_new_tokens the server would reject, before sending.
    timeout: seconds to wait for each answer; retries of 429/503 (`retry`) never shorten it.

    Generation calls take SamplingParams or its fields as keywords. max_new_tokens=N is used
    as given (and refused, before sending, when prompt + N cannot fit); left unset, it is
    what the server's context leaves after the prompt, at most AUTO_MAX_NEW_TOKENS
    (`answer_length` tells which, for a prompt).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        adapter_id: str | None = None,
        backend: str = "auto",
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        known_adapters: Sequence[str] | None = None,
        check_limits: bool = True,
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise InvalidParameterError(f"url must start with http:// or https://, got {self.url!r}")
        # A port that is not a number (SERVE_PORT=abc) was an InvalidURL traceback from httpx; one out of
        # range was reported as "no server answered".
        parts = urllib.parse.urlsplit(self.url)
        try:
            parts.port  # noqa: B018 - read for its ValueError
        except ValueError as e:
            raise InvalidParameterError(f"url {self.url!r} (--url, SERVE_URL or SERVE_PORT): {e}") from None
        if not parts.hostname:
            raise InvalidParameterError(f"url {self.url!r} (--url or SERVE_URL) names no host")
        if backend != "auto" and backend not in BACKENDS:
            raise InvalidParameterError(
                f"backend must be auto or one of {', '.join(BACKENDS)}, got {backend!r}"
            )
        self.transport = Transport(
            self.url,
            api_key=api_key if api_key is not None else os.environ.get("API_KEY") or None,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retry=retry or RetryPolicy(),
        )
        self._hub = _HubClient(self.transport)
        self._backend_choice = backend
        self._info: ServerInfo | None = None
        self.model = model
        self.adapter_id = adapter_id
        env_adapters = adapter_ids(os.environ.get("LORA_ADAPTERS")) or None
        self.known_adapters = tuple(known_adapters) if known_adapters is not None else env_adapters
        self.check_limits = check_limits
        self._warned: set[str] = set()  # each adapter warning once per client

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the server ---------------------------------------------------------------------

    @property
    def info(self) -> ServerInfo:
        """Which server this is and its limits (asked once, then kept)."""
        if self._info is None:
            self._info = discover(self.transport, self._backend_choice)
            self.transport.server_name = self._info.name
        return self._info

    @property
    def backend(self) -> Backend:
        """What the client knows about the server it talks to (serving.backends)."""
        return get_backend(self.info.backend)

    def health(self) -> bool:
        """True when the server answers 200 on /health (TGI: all shards ready), or, for a server
        without /health (llama.cpp's), when it describes itself on /v1/models."""
        try:
            self.transport.request(
                "GET", "/health", retry=NO_RETRY, timeout=min(self.transport.timeout, 10.0)
            )
        except NotFoundError:
            try:
                self._info = discover(self.transport, self._backend_choice)
            except ServingError:
                return False
        except ServingError:
            return False
        return True

    def wait_until_healthy(
        self, timeout: float = 600.0, interval: float = 1.0, on_wait: Callable[[float], None] | None = None
    ) -> ServerInfo:
        """Poll /health until it answers 200 (a 13B model can take minutes to load), then describe the server."""
        started = time.monotonic()
        while not self.health():
            waited = time.monotonic() - started
            if waited + interval > timeout:
                raise ServerTimeoutError(
                    f"no healthy server at {self.url} after {waited:.0f} s; check the server's logs "
                    "(docker compose logs tgi|vllm), or start one with `make serve`",
                    url=self.url,
                )
            if on_wait is not None:
                on_wait(waited)
            time.sleep(interval)
        self._info = None
        return self.info

    def count_tokens(self, prompt: str | None = None, messages: Messages | None = None) -> int | None:
        """Tokens in a prompt (or a chat, with its template), counted by the server; None if it cannot."""
        chat = _messages(messages) if messages is not None else None
        try:
            return self.backend.count_tokens(self.transport, self.info, prompt, chat)
        except NotFoundError:
            return None
        except (KeyError, TypeError) as e:
            raise ServerError(f"{self.url}: unexpected tokenize answer ({e})", url=self.url) from None

    def answer_length(self, prompt: str | None = None, messages: Messages | None = None) -> AnswerLength:
        """The max_new_tokens a request with this prompt (or chat) gets when the caller leaves it unset."""
        chat = _messages(messages) if messages is not None else None
        info = self.info
        total = info.max_total_tokens
        if total is None:  # limits unknown: the server refuses what does not fit
            return AnswerLength(AUTO_MAX_NEW_TOKENS, info.name)
        bound = _prompt_bound(prompt, chat)
        if bound <= self._max_input(info) and bound + AUTO_MAX_NEW_TOKENS <= total:
            return AnswerLength(AUTO_MAX_NEW_TOKENS, info.name, total)
        n = self.count_tokens(prompt=prompt, messages=chat)
        if n is None:  # cannot count here: the bound is over the prompt's tokens
            return AnswerLength(max(1, min(AUTO_MAX_NEW_TOKENS, total - bound)), info.name, total)
        self._check_prompt(n, info)
        return AnswerLength(min(AUTO_MAX_NEW_TOKENS, total - n), info.name, total, n)

    # --- generation -----------------------------------------------------------------------

    def generate(
        self, prompt: str, params: SamplingParams | None = None, *, adapter_id: str | None = None, **kw
    ) -> Completion:
        """Continue `prompt` as is (no chat template): TGI /generate, else /v1/completions."""
        p, adapter = self._prepare("generate", params, kw, adapter_id, prompt=prompt)
        if self.backend.raw_route == GENERATE_ROUTE:
            out = self._hub.text_generation(
                prompt, **self.backend.raw_fields(p), **({"adapter_id": adapter} if adapter else {})
            )
            details = out.details
            return Completion(
                text=out.generated_text,
                finish_reason=_finish(details.finish_reason) if details else None,
                generated_tokens=details.generated_tokens if details else None,
                seed=details.seed if details else None,
                raw=out,
            )
        body = {"model": adapter or self._model(), "prompt": prompt, **self.backend.raw_fields(p)}
        data = self.transport.post_json(self.backend.raw_route, body)
        try:
            choice, usage = data["choices"][0], data.get("usage") or {}
            return Completion(
                text=choice["text"],
                finish_reason=_finish(choice.get("finish_reason")),
                prompt_tokens=usage.get("prompt_tokens"),
                generated_tokens=usage.get("completion_tokens"),
                seed=p.seed,
                raw=data,
            )
        except (KeyError, IndexError, TypeError):
            raise ServerError(
                f"{self.url}/v1/completions: unexpected answer {str(data)[:300]}", url=self.url
            ) from None

    def stream(
        self, prompt: str, params: SamplingParams | None = None, *, adapter_id: str | None = None, **kw
    ) -> Iterator[Chunk]:
        """Like `generate`, token by token as the server produces them."""
        p, adapter = self._prepare("generate", params, kw, adapter_id, prompt=prompt)
        if self.backend.raw_route == GENERATE_ROUTE:
            extra = {"adapter_id": adapter} if adapter else {}
            events = self._hub.text_generation(prompt, stream=True, **self.backend.raw_fields(p), **extra)
            return self._tgi_chunks(events)
        body = {
            "model": adapter or self._model(),
            "prompt": prompt,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.backend.raw_fields(p),
        }
        response = self.transport.request("POST", self.backend.raw_route, json_body=body, stream=True)
        return self._completion_chunks(self.transport.sse_lines(response))

    def chat(
        self, messages: Messages, params: SamplingParams | None = None, *, adapter_id: str | None = None, **kw
    ) -> Completion:
        """Answer a conversation (a string is one user message), formatted by the model's chat template."""
        msgs = _messages(messages)
        p, adapter = self._prepare("chat", params, kw, adapter_id, messages=msgs)
        out = self._hub.chat_completion(msgs, model=self._chat_model(adapter), **self.backend.chat_fields(p))
        choice = out.choices[0]
        usage = out.usage
        return Completion(
            text=choice.message.content or "",
            finish_reason=_finish(choice.finish_reason),
            prompt_tokens=usage.prompt_tokens if usage else None,
            generated_tokens=usage.completion_tokens if usage else None,
            seed=p.seed,
            raw=out,
        )

    def chat_stream(
        self, messages: Messages, params: SamplingParams | None = None, *, adapter_id: str | None = None, **kw
    ) -> Iterator[Chunk]:
        """Like `chat`, piece by piece as the server produces them."""
        msgs = _messages(messages)
        p, adapter = self._prepare("chat", params, kw, adapter_id, messages=msgs)
        chunks = self._hub.chat_completion(
            msgs,
            model=self._chat_model(adapter),
            stream=True,
            stream_options={"include_usage": True},
            **self.backend.chat_fields(p),
        )
        return self._chat_chunks(chunks)

    # --- helpers -------------------------------------------------------------------------

    def _model(self) -> str:
        return self.model or self.info.model

    def _chat_model(self, adapter: str | None) -> str:
        return self.backend.chat_model(self._model(), adapter)

    def _prepare(
        self,
        api: str,
        params: SamplingParams | None,
        overrides: dict[str, Any],
        adapter_id: str | None,
        *,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> tuple[SamplingParams, str | None]:
        try:
            p = dataclasses.replace(params or SamplingParams(), **overrides)
        except TypeError as e:
            names = ", ".join(f.name for f in dataclasses.fields(SamplingParams))
            raise InvalidParameterError(f"{e}; the generation parameters are: {names}") from None
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise InvalidParameterError("prompt must be a non-empty string")
        self.backend.check_params(p, api, self.info)
        adapter = adapter_id or self.adapter_id
        if adapter:
            warning = self.backend.check_adapter(adapter, self.info, self.known_adapters, self.url)
            if warning and warning not in self._warned:
                self._warned.add(warning)
                warnings.warn(warning, UnknownAdapterWarning, stacklevel=3)
        if p.max_new_tokens is None:  # fits by construction: nothing left to check
            p = dataclasses.replace(p, max_new_tokens=self.answer_length(prompt, messages).tokens)
        elif self.check_limits:
            self._check_limits(p, prompt, messages)
        return p, adapter

    @staticmethod
    def _max_input(info: ServerInfo) -> int:
        return info.max_input_tokens or info.max_total_tokens - 1

    def _check_prompt(self, n: int, info: ServerInfo) -> None:
        max_input = self._max_input(info)
        if n > max_input:
            raise LimitExceededError(
                f"the prompt is {n} tokens and {info.name} at {self.url} accepts at most {max_input} "
                "input tokens; shorten it"
            )

    def _check_limits(
        self, p: SamplingParams, prompt: str | None, messages: list[dict[str, Any]] | None
    ) -> None:
        info = self.info
        total = info.max_total_tokens
        if total is None:
            return
        where = f"{info.name} at {self.url}"
        if p.max_new_tokens >= total:
            raise LimitExceededError(
                f"max_new_tokens={p.max_new_tokens} is more than {where} allows: it takes at most {total} tokens "
                f"per request, prompt and answer together, so at most {total - 1} new tokens"
            )
        bound = _prompt_bound(prompt, messages)
        if bound <= self._max_input(info) and bound + p.max_new_tokens <= total:
            return
        n = self.count_tokens(prompt=prompt, messages=messages)
        if n is None:
            return
        self._check_prompt(n, info)
        if n + p.max_new_tokens > total:
            raise LimitExceededError(
                f"the prompt ({n} tokens) + max_new_tokens ({p.max_new_tokens}) = {n + p.max_new_tokens} tokens, "
                f"over the {total} per request that {where} accepts; lower max_new_tokens to {total - n} "
                "or shorten the prompt"
            )

    def _tgi_chunks(self, events) -> Iterator[Chunk]:
        finished = False
        for event in events:
            details = event.details
            # TGI's last event carries the whole text (and the details, where they were asked for).
            finished = finished or details is not None or event.generated_text is not None
            yield Chunk(
                text="" if event.token.special else event.token.text,
                tokens=1,
                finish_reason=_finish(details.finish_reason) if details else None,
                generated_tokens=details.generated_tokens if details else None,
            )
        if not finished:
            raise self._cut_off()

    def _completion_chunks(self, lines: Iterator[str]) -> Iterator[Chunk]:
        finished = False
        for line in lines:
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            payload = json.loads(data)
            choice = (payload.get("choices") or [{}])[0]
            usage = payload.get("usage") or {}
            text = choice.get("text") or ""
            finish = _finish(choice.get("finish_reason"))
            finished = finished or finish is not None
            if text or finish or usage:
                yield Chunk(text=text, finish_reason=finish, generated_tokens=usage.get("completion_tokens"))
        if not finished:
            raise self._cut_off()

    def _chat_chunks(self, chunks) -> Iterator[Chunk]:
        finished = False
        for chunk in chunks:
            choice = chunk.choices[0] if chunk.choices else None
            text = (choice.delta.content or "") if choice and choice.delta else ""
            finish = _finish(choice.finish_reason) if choice else None
            finished = finished or finish is not None
            usage = chunk.usage
            if text or finish or usage:
                yield Chunk(
                    text=text,
                    finish_reason=finish,
                    generated_tokens=usage.completion_tokens if usage else None,
                )
        if not finished:
            raise self._cut_off()

    def _cut_off(self) -> ServerError:
        # A server that fails while generating may just end the stream (llama.cpp's did): without
        # this the caller would take a cut-off answer for a whole one.
        return ServerError(
            f"{self.transport.server_name} at {self.url} ended the stream before the answer was finished "
            "(no finish_reason); its log may say why",
            url=self.url,
        )
