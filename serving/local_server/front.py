"""The OpenAI-facing front of the local CPU server: names, limits, sampling and access, around `transformers serve`.

`transformers serve` pinned to a local directory answers only requests whose `model` is
that exact path, reports `<path>@main` as the model, and lists nothing on /v1/models (it
lists the Hub cache). Chat UIs and the `openai` package pick a model from /v1/models and
send its id, so as is, no client could use it without knowing the file path. This ASGI
middleware puts the run's name in front of it, the way vLLM's --served-model-name does:

- /v1/models lists the served name with its max_model_len (vLLM's field);
- chat and completion requests naming it (or no model) are routed to the pinned model,
  any other name is answered 404, and responses carry the served name;
- sampling follows OpenAI's meaning: temperature > 0 samples even when the model's
  generation_config says do_sample=false (transformers would silently decode greedily),
  and vLLM's extra fields top_k and repetition_penalty are accepted;
- requests for log-probabilities (logprobs, top_logprobs, echo) are refused with 400:
  transformers serve would ignore them and answer without;
- prompt + max_tokens is held to max_model_len (400 otherwise, as vLLM does), and a
  missing max_tokens means "the rest of the context" instead of transformers' 1024;
- POST /tokenize counts tokens (vLLM's request and response shape), so clients can
  check a prompt's length before sending it;
- an optional API key (Authorization: Bearer), and only these routes plus /health:
  transformers' /reset and /load_model would let any local process unload the model;
- what transformers would silently ignore (n, logprobs, non-text content parts, ...) is
  refused with a 400 (serving.local_server.validation);
- what transformers serve would take unchecked and then fail on (stop, seed, frequency_penalty,
  logit_bias, tools, its own generation_config) is checked: a 400 naming the field, not a bare 500;
- bodies are bounded (413) and prompts are tokenized in a worker thread, so one huge
  request cannot hold the event loop (and /health) for seconds; the chat template's own
  rejections are 400s, and any other failure is a 500 whose traceback goes to the log.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jinja2.exceptions import TemplateError, TemplateSyntaxError

from serving.backends.local import OWNER
from serving.local_server.validation import RequestError, refuse_unsupported, text_message

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
# apply_chat_template's own arguments, which the front and transformers serve set: a request's
# chat_template_kwargs naming one would make the call fail (a TypeError) instead of a clear 400.
RESERVED_TEMPLATE_ARGS = frozenset(
    {"conversation", "tools", "add_generation_prompt", "tokenize", "return_dict", "return_tensors"}
)
# Checked here, so a bad value is a 400 that says why rather than an error inside transformers.
SAMPLING_FIELDS = (
    ("temperature", lambda v: v >= 0, "a number >= 0"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("top_k", lambda v: v >= 0 and float(v).is_integer(), "a whole number >= 0 (0: no limit)"),
    ("repetition_penalty", lambda v: v > 0, "> 0"),
    ("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
)
# A prompt that fits the context needs far less than this many bytes of JSON per token (escaped
# CJK text is about 6 per character). Larger bodies are refused before they are read: parsing
# and tokenizing a 5 MB prompt took 11-17 s here, only to be refused as too long.
BODY_BYTES_PER_TOKEN = 64
MIN_BODY_BYTES = 1024 * 1024
# The seeds torch.manual_seed takes (transformers serve seeds with it); others were an OverflowError 500.
SEED_MIN, SEED_END = -(2**63), 2**64
log = logging.getLogger(__name__)


def body_limit(max_model_len: int) -> int:
    """The largest request body the server reads, for its context length."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_model_len)


def _error_body(status: int, message: str, error_type: str, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": status}},
        ensure_ascii=False,
    ).encode()


async def _respond(send: Send, status: int, body: bytes, content_type: str = "application/json") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class OpenAIFront:
    def __init__(
        self,
        app: ASGIApp,
        *,
        served_name: str,
        tokenizer,
        generation_defaults: dict[str, Any],
        max_model_len: int,
        api_key: str | None = None,
    ) -> None:
        self.app = app
        self.served_name = served_name
        self.tokenizer = tokenizer
        self.generation_defaults = generation_defaults
        self.max_model_len = max_model_len
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = body_limit(max_model_len)
        self.created = int(time.time())
        # Tokenizing (and rendering the chat template) takes the CPU for as long as the prompt is
        # long; off the event loop, /health and other requests are answered meanwhile. One thread:
        # requests are generated one at a time anyway, and a tokenizer is not shared across threads.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-server-tokenize")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        try:
            answer, forward = await self._handle(scope, receive)
        except RequestError as e:
            await _respond(send, e.status, _error_body(e.status, str(e), e.error_type, e.param))
            return
        except Exception as e:  # a bug here, not the client's doing: say so, and keep the traceback
            log.exception("the local server failed on %s %s", method, path)
            message = (
                f"the server failed on this request ({type(e).__name__}: {e}); its log has the traceback"
            )
            await _respond(send, 500, _error_body(500, message, "InternalServerError"))
            return
        if forward is not None:
            await self._forward(scope, forward, receive, send)
        else:
            await _respond(send, 200, json.dumps(answer).encode())

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[Any, dict[str, Any] | None]:
        """(the answer, None) for the front's own routes, (None, the rewritten body) for generation."""
        path, method = scope["path"], scope["method"]
        self._authorize(scope)
        if path == "/v1/models" and method in ("GET", "OPTIONS"):
            return self.models(), None
        if path == "/tokenize" and method == "POST":
            body = await self._json_body(scope, receive)
            return await self._off_loop(self.tokenize, body), None
        if path in GENERATION_ROUTES and method == "POST":
            body = await self._json_body(scope, receive)
            return None, await self._off_loop(self.prepare, path, body)
        hint = ""
        if path == "/" and method == "POST":
            hint = (
                "; POST / is TGI's own route (huggingface_hub's InferenceClient.text_generation): "
                "send raw prompts to POST /v1/completions, or chat to POST /v1/chat/completions"
            )
        raise RequestError(
            404,
            f"no route {method} {path} on this server; it serves GET /health, GET /v1/models, "
            f"POST /v1/chat/completions, POST /v1/completions and POST /tokenize{hint}",
            "NotFoundError",
        )

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _authorize(self, scope: Scope) -> None:
        if not self.api_key:
            return
        # Compared as bytes: a header may hold any byte, and compare_digest refuses non-ASCII str.
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
            raise RequestError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "AuthenticationError"
            )

    def _too_large(self, size: str) -> RequestError:
        return RequestError(
            413,
            f"the request body is {size} bytes; this server reads at most {self.max_body_bytes} bytes "
            f"({self.max_body_bytes // 1024} KiB), far more than a prompt that fits its "
            f"{self.max_model_len}-token context needs",
            "PayloadTooLargeError",
        )

    async def _json_body(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(declared.decode())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "the client went away before sending the whole request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(f"over {self.max_body_bytes}")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        try:
            body = json.loads(b"".join(chunks) or b"{}")
        except ValueError as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    # --- the routes -------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        card = {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": OWNER,
            "root": self.served_name,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        return {"object": "list", "data": [card]}

    def _check_model(self, body: dict[str, Any]) -> None:
        """The served name or no model at all, as vLLM takes them; any other name is a 404."""
        requested = body.pop("model", None)
        if requested is not None and requested != self.served_name:
            hint = ""
            if requested == "dummy":
                hint = (
                    " huggingface_hub's InferenceClient sends `dummy` when it is given no model: "
                    f"pass model='{self.served_name}' to chat_completion."
                )
            raise RequestError(
                404,
                f"The model `{requested}` does not exist; this server serves `{self.served_name}` "
                f"(see GET /v1/models): name it in `model`, or leave `model` out.{hint}",
                "NotFoundError",
                "model",
            )

    def _prompt_ids(self, body: dict[str, Any], route: str) -> list[int]:
        if route == "/v1/completions" or "prompt" in body:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise RequestError(400, "prompt must be a string", param="prompt")
            add_special = body.get("add_special_tokens", True)
            if not isinstance(add_special, bool):
                raise RequestError(
                    400, "add_special_tokens must be true or false", param="add_special_tokens"
                )
            return self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages must be a non-empty list of {role, content}", param="messages")
        texts = [text_message(m, i) for i, m in enumerate(messages)]
        extra = body.get("chat_template_kwargs") or {}
        if not isinstance(extra, dict) or RESERVED_TEMPLATE_ARGS & extra.keys():
            raise RequestError(
                400,
                "chat_template_kwargs must be an object of variables for the chat template, without "
                f"{', '.join(sorted(RESERVED_TEMPLATE_ARGS))}",
                param="chat_template_kwargs",
            )
        tools = body.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            # A list item that is not an object was a ValueError inside apply_chat_template: a 500.
            raise RequestError(
                400,
                "tools must be a list of tool definitions (JSON objects: {type: function, ...})",
                param="tools",
            )
        try:
            ids = self.tokenizer.apply_chat_template(
                texts,
                add_generation_prompt=body.get("add_generation_prompt", True),
                tools=tools,
                tokenize=True,
                return_dict=True,
                **extra,
            )["input_ids"]
        except TemplateSyntaxError:
            raise  # the served model's template is broken: the server's fault, a 500
        except TemplateError as e:  # the template's own raise_exception(...): its message is for the user
            raise RequestError(
                400, f"the chat template rejected the messages: {e}", param="messages"
            ) from None
        return list(ids)

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_model(body)
        ids = self._prompt_ids(body, "/tokenize")
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    def prepare(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """Validate a generation request and rewrite it for transformers serve."""
        self._check_model(body)
        refuse_unsupported(route, body)
        prompt_len = len(self._prompt_ids(body, route))
        if route == "/v1/chat/completions" and body.get("max_completion_tokens") is not None:
            key = "max_completion_tokens"
        else:
            key = "max_tokens"
        max_tokens = body.get(key)
        room = self.max_model_len - prompt_len
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise RequestError(400, f"{key} must be a whole number >= 1, got {max_tokens!r}", param=key)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" + {max_tokens} for the completion" if max_tokens is not None else ""
            raise RequestError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{prompt_len} in the prompt{asked}. Shorten the prompt or lower {key}.",
                param=key,
            )
        body[key] = max_tokens if max_tokens is not None else room
        _check_generation_fields(body, vocab=len(self.tokenizer))
        if "generation_config" not in body:
            body["generation_config"] = json.dumps(self._generation_config(body))
        return body

    def _generation_config(self, body: dict[str, Any]) -> dict[str, Any]:
        """The model's generation defaults with the request's sampling choices, OpenAI's way."""
        config = dict(self.generation_defaults)
        temperature = body.get("temperature")
        if temperature is not None:
            config["do_sample"] = temperature > 0
            if temperature == 0:
                body.pop("temperature")  # greedy: transformers would warn that temperature is unused
                body.pop("top_p", None)
        for name in ("top_k", "repetition_penalty", "min_p"):
            if name in body:
                config[name] = body.pop(name)
        if config.get("do_sample") and "top_k" not in config:
            config["top_k"] = 0  # OpenAI and vLLM apply no top-k unless asked; transformers would use 50
        return config

    # --- forwarding -----------------------------------------------------------------------

    async def _forward(self, scope: Scope, body: dict[str, Any], receive: Receive, send: Send) -> None:
        payload = json.dumps(body, ensure_ascii=False).encode()
        delivered = False

        async def replay() -> Message:
            # The rewritten body first; after that the real channel, on which Starlette's
            # streaming responses wait for the client to disconnect.
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await self.app({**scope, "headers": headers}, replay, _RenameModel(send, self.served_name))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_sampling(fields: dict[str, Any], where: str = "") -> None:
    for name, ok, allowed in SAMPLING_FIELDS:
        value = fields.get(name)
        if value is not None and (not _is_number(value) or not ok(value)):
            raise RequestError(400, f"{where}{name} must be {allowed}, got {value!r}", param=name)


def _check_generation_fields(body: dict[str, Any], *, vocab: int) -> None:
    """The fields transformers serve passes on unchecked. A wrong type or value in any of them
    failed inside transformers as a bare "Internal Server Error" 500 (a TypeError or ValueError in
    its log) instead of a 400 that names the field; the sampling fields were checked only when the
    request brought no generation_config of its own."""
    _check_sampling(body)
    stop = body.get("stop")
    if stop == []:
        body.pop("stop")  # no stop strings, as OpenAI and vLLM read it (transformers failed on it)
    elif stop is not None and not (
        (isinstance(stop, str) and stop)
        or (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop))
    ):
        raise RequestError(
            400, f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}", param="stop"
        )
    seed = body.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed < SEED_END
    ):
        raise RequestError(400, f"seed must be a whole number in [-2**63, 2**64), got {seed!r}", param="seed")
    # transformers serve applies frequency_penalty as repetition_penalty = 1 + frequency_penalty,
    # which must stay above 0; OpenAI's range ends at 2.
    penalty = body.get("frequency_penalty")
    if penalty is not None and (not _is_number(penalty) or not -1 < penalty <= 2):
        raise RequestError(
            400,
            f"frequency_penalty must be a number in (-1, 2] (the local server applies it as repetition_penalty "
            f"1 + frequency_penalty), got {penalty!r}",
            param="frequency_penalty",
        )
    bias = body.get("logit_bias")
    if bias is not None and not (
        isinstance(bias, dict)
        and all(k.isdigit() and int(k) < vocab and _is_number(v) for k, v in bias.items())
    ):
        raise RequestError(
            400,
            f'logit_bias must map token ids (0 .. {vocab - 1}) to numbers, e.g. {{"1234": -100}}, got {bias!r}',
            param="logit_bias",
        )
    if bias is not None:
        # transformers' sequence_bias takes floats only: {"1234": -100} (OpenAI's own example) was a 500.
        body["logit_bias"] = {k: float(v) for k, v in bias.items()}
    own = body.get("generation_config")
    if own is not None:
        # transformers' own field: a JSON string of GenerationConfig's settings, used instead of the
        # model's defaults. It is parsed without a check there: the sampling values are checked here.
        try:
            config = json.loads(own) if isinstance(own, str) else None
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise RequestError(
                400,
                "generation_config must be a string holding a JSON object of generation settings, "
                f"e.g. '{{\"do_sample\": true}}', got {own!r}",
                param="generation_config",
            )
        _check_sampling(config, "generation_config: ")


class _RenameModel:
    """Wraps `send`: the served name replaces transformers' internal model id in responses."""

    def __init__(self, send: Send, served_name: str) -> None:
        self.send = send
        self.served_name = served_name
        self.mode = "pass"
        self.start: Message | None = None
        self.buffer = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if content_type.startswith(b"application/json"):
                self.mode, self.start = "json", message
                return
            if content_type.startswith(b"text/event-stream"):
                self.mode = "sse"
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if more:
                return
            body = self._rename_json(self.buffer)
            headers = [(k, v) for k, v in self.start["headers"] if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await self.send({**self.start, "headers": headers})
            await self.send({"type": "http.response.body", "body": body})
            return
        events, _, rest = self.buffer.rpartition(b"\n\n")
        self.buffer = rest
        out = b"".join(self._rename_event(e) + b"\n\n" for e in events.split(b"\n\n")) if events else b""
        if not more and rest:
            out += self._rename_event(rest)
            self.buffer = b""
        await self.send({"type": "http.response.body", "body": out, "more_body": more})

    def _rename_json(self, raw: bytes) -> bytes:
        try:
            data = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(data, dict) and "model" in data:
            data["model"] = self.served_name
            return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        return raw

    def _rename_event(self, event: bytes) -> bytes:
        lines = []
        for line in event.split(b"\n"):
            if line.startswith(b"data: {"):
                line = b"data: " + self._rename_json(line[len(b"data: ") :])
            lines.append(line)
        return b"\n".join(lines)
