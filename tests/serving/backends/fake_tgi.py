"""A small real HTTP server on 127.0.0.1 that answers like TGI 3.3.7's router, for what only TGI does.

It follows huggingface/text-generation-inference at tag v3.3.7 (commit dfb3fbe), as its source does it:
- router/src/validation.rs, Validation::validate and validate_input: the parameter checks in their
  order and with ValidationError's messages; max_new_tokens, when unset, is max_total_tokens minus
  the input tokens, and the total is checked with at most DEFAULT_GENERATION_LENGTH (1024) new tokens
  (TGI generates longer answers in chunks of that), MaxTotalTokens before InputLength;
- router/src/infer/mod.rs: InferError ("Input validation error: ...", its error_type), and the error
  event of chat streams, {"error": {"message", "http_status_code": 422}} (into_openai_event);
- router/src/server.rs: the routes, the ones --api-key guards (401 with an empty body), POST / answering
  a list (compat_generate), /generate_stream reporting errors as events after its 200, chat streams
  ending with [DONE] after an error event, /health answering 503 {"error": "unhealthy",
  "error_type": "healthcheck"} while the backend is not healthy;
- router/src/lib.rs: GenerateResponse, StreamResponse, ChatCompletion(Chunk), Info, ErrorResponse, and
  ChatRequest::try_into_generate: temperature 0 is greedy, presence_penalty + 2 is the repetition
  penalty, max_tokens is max_new_tokens, a `model` other than "tgi" is an adapter id.
Its "tokenizer" splits on whitespace, its chat template writes "<|role|>content\n" per message, and its
"model" answers with the words of `reply`. It records every request for the tests.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL_ID = "/outputs/quickstart/merged"
# Routes TGI puts behind --api-key (router/src/server.rs); /health, /info, /v1/models stay open.
PROTECTED = {"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/tokenize"}


DEFAULT_GENERATION_LENGTH = 1024  # validation.rs: new tokens validated (and generated) per chunk


class ValidationFailed(Exception):
    """A ValidationError of validation.rs, as InferError::ValidationError reports it."""

    def __init__(self, message: str) -> None:
        self.message = f"Input validation error: {message}"
        super().__init__(self.message)

    def body(self) -> dict:
        return {"error": self.message, "error_type": "validation"}


def _or(value, default):
    """Rust's Option::unwrap_or: JSON null and a missing field both take the default."""
    return default if value is None else value


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeTGI:
    def __init__(
        self, *, reply: str = "はい 東京 です 。", max_input: int = 255, max_total: int = 256, api_key=None
    ):
        self.reply = reply.split()
        self.max_input, self.max_total = max_input, max_total
        self.max_stop_sequences, self.max_top_n_tokens = 4, 5  # the launcher's defaults
        self.ready = True  # False: /health answers 503, as while TGI's backend is not healthy yet
        self.api_key = api_key
        self.requests: list[Seen] = []
        # Answers given before normal handling, one per request: (status, JSON body or None, headers).
        self.queued: list[tuple[int, Any, dict[str, str]]] = []
        self.delay = 0.0
        self.stream_error: dict | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]

    def info(self) -> dict:
        return {
            "model_id": MODEL_ID,
            "model_sha": None,
            "model_pipeline_tag": None,
            "max_concurrent_requests": 128,
            "max_best_of": 2,
            "max_stop_sequences": self.max_stop_sequences,
            "max_input_tokens": self.max_input,
            "max_total_tokens": self.max_total,
            "validation_workers": 2,
            "max_client_batch_size": 4,
            "router": "text-generation-router",
            "version": "3.3.7",
            "sha": None,
            "docker_label": None,
        }

    # --- TGI behaviour --------------------------------------------------------------------

    def validate(self, inputs: str, p: dict, *, streaming: bool = False) -> tuple[int, int]:
        """Validation::validate: (input tokens, new tokens to generate), or ValidationFailed."""
        best_of = p.get("best_of") or 1
        if streaming and best_of != 1:  # server.rs, generate_stream_internal: before validation
            raise ValidationFailed("`best_of` != 1 is not supported when streaming tokens")
        if streaming and p.get("decoder_input_details"):
            raise ValidationFailed("`decoder_input_details` == true is not supported when streaming tokens")
        sampling = bool(p.get("do_sample")) or any(
            p.get(k) is not None for k in ("temperature", "top_k", "top_p", "typical_p")
        )
        if best_of > 1 and not sampling:
            raise ValidationFailed("you must use sampling when `best_of` is > 1")
        if _or(p.get("temperature"), 1.0) <= 0:
            raise ValidationFailed("`temperature` must be strictly positive")
        if _or(p.get("repetition_penalty"), 1.0) <= 0:
            raise ValidationFailed("`repetition_penalty` must be strictly positive")
        if not -2.0 <= _or(p.get("frequency_penalty"), 0.0) <= 2.0:
            raise ValidationFailed("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if p.get("top_p") is not None and not 0 < p["top_p"] < 1:
            raise ValidationFailed("`top_p` must be > 0.0 and < 1.0")
        if p.get("typical_p") is not None and not 0 < p["typical_p"] < 1:
            raise ValidationFailed("`typical_p` must be > 0.0 and < 1.0")
        if p.get("top_k") is not None and p["top_k"] <= 0:
            raise ValidationFailed("`top_k` must be strictly positive")
        if p.get("max_new_tokens") == 0:
            raise ValidationFailed("`max_new_tokens` must be strictly positive")
        stop = p.get("stop") or []
        if len(stop) > self.max_stop_sequences:
            raise ValidationFailed(
                f"`stop` supports up to {self.max_stop_sequences} stop sequences. Given: {len(stop)}"
            )
        if p.get("seed") is not None and best_of > 1:
            raise ValidationFailed("`seed` must not be set when `best_of` > 1")
        if (p.get("top_n_tokens") or 0) > self.max_top_n_tokens:
            raise ValidationFailed(
                f"`top_n_tokens` must be >= 0 and <= {self.max_top_n_tokens}. Given: {p['top_n_tokens']}"
            )
        if not inputs:
            raise ValidationFailed("`inputs` cannot be empty")
        truncate = p.get("truncate")
        if truncate is not None and (truncate == 0 or truncate > self.max_input):
            raise ValidationFailed(
                f"`truncate` must be strictly positive and less than {self.max_input}. Given: {truncate}"
            )
        # validate_input
        n = len(inputs.split())
        input_length = min(n, truncate) if truncate else n
        asked = p.get("max_new_tokens")
        wanted = asked if asked is not None else max(self.max_total - input_length, 0)
        max_new = min(wanted, DEFAULT_GENERATION_LENGTH)
        if input_length + max_new > self.max_total:
            raise ValidationFailed(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total}. "
                f"Given: {input_length} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        if input_length > self.max_input:
            raise ValidationFailed(
                f"`inputs` must have less than {self.max_input} tokens. Given: {input_length}"
            )
        return input_length, max_new

    def tokens(self, max_new: int) -> tuple[list[str], str]:
        """The reply up to max_new words: "length" when cut there, else the model's end of sequence."""
        return self.reply[:max_new], ("length" if max_new < len(self.reply) else "eos_token")

    def generate(self, body: dict) -> tuple[int, Any]:
        p = body.get("parameters") or {}
        try:
            _, max_new = self.validate(body.get("inputs", ""), p)
        except ValidationFailed as e:
            return 422, e.body()
        words, finish = self.tokens(max_new)
        response: dict[str, Any] = {"generated_text": " ".join(words)}
        if p.get("details"):
            response["details"] = {
                "finish_reason": finish,
                "generated_tokens": len(words),
                "seed": p.get("seed", 42 if p.get("do_sample") else None),
                "prefill": [],
                "tokens": [
                    {"id": i, "text": w, "logprob": -0.5, "special": False} for i, w in enumerate(words)
                ],
            }
        return 200, response

    def generate_events(self, body: dict) -> list[dict]:
        p = body.get("parameters") or {}
        try:
            input_length, max_new = self.validate(body.get("inputs", ""), p, streaming=True)
        except ValidationFailed as e:  # after the 200: an event, and no [DONE] on this route
            return [e.body()]
        words, finish = self.tokens(max_new)
        tokens = [
            {"id": i, "text": w if i == 0 else " " + w, "logprob": -0.5, "special": False}
            for i, w in enumerate(words)
        ]
        if finish == "eos_token":
            tokens.append({"id": 2, "text": "</s>", "logprob": -0.1, "special": True})
        events = []
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            details = None
            if last and p.get("details"):
                details = {
                    "finish_reason": finish,
                    "generated_tokens": len(tokens),
                    "seed": None,
                    "input_length": input_length,
                }
            events.append(
                {
                    "index": i + 1,
                    "token": token,
                    "generated_text": " ".join(words) if last else None,
                    "details": details,
                }
            )
            if self.stream_error and i == 0:
                return [events[0], self.stream_error]
        return events

    @staticmethod
    def chat_prompt(messages: list[dict]) -> str:
        return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)

    def chat(self, body: dict) -> tuple[int, Any]:
        """ChatRequest::try_into_generate, then the generate path; a stream reports errors as an event."""
        temperature = body.get("temperature")
        presence = body.get("presence_penalty")
        p = {
            "do_sample": temperature != 0,
            "temperature": None if temperature == 0 else temperature,
            "repetition_penalty": None if presence is None else presence + 2.0,
            "frequency_penalty": body.get("frequency_penalty"),
            "top_p": body.get("top_p"),
            "max_new_tokens": body.get("max_tokens", body.get("max_completion_tokens")),
            "stop": body.get("stop") or [],
            "seed": body.get("seed"),
            "top_n_tokens": body.get("top_logprobs"),
        }
        try:
            input_length, max_new = self.validate(self.chat_prompt(body.get("messages") or []), p)
        except ValidationFailed as e:
            if body.get("stream"):
                return 200, [{"error": {"message": e.message, "http_status_code": 422}}]
            return 422, e.body()
        words, finish = self.tokens(max_new)
        usage = {
            "prompt_tokens": input_length,
            "completion_tokens": len(words),
            "total_tokens": input_length + len(words),
        }
        reason = "stop" if finish == "eos_token" else finish
        model = body.get("model") if body.get("model") not in (None, "tgi") else MODEL_ID
        if not body.get("stream"):
            return 200, {
                "object": "chat.completion",
                "id": "",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "3.3.7-sha-dfb3fbe",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(words)},
                        "logprobs": None,
                        "finish_reason": reason,
                    }
                ],
                "usage": usage,
            }
        chunks = []
        for i, w in enumerate(words):
            last = i == len(words) - 1
            chunks.append(
                {
                    "object": "chat.completion.chunk",
                    "id": "",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "3.3.7-sha-dfb3fbe",
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": w if i == 0 else " " + w},
                            "logprobs": None,
                            "finish_reason": reason if last else None,
                        }
                    ],
                    "usage": None,
                }
            )
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**chunks[-1], "choices": [], "usage": usage})
        return 200, chunks

    # --- HTTP -----------------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> Any:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                return json.loads(raw) if raw else None

            def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
                data = b"" if payload is None else json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("content-type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _sse(self, events: list, done: bool) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("connection", "close")
                self.end_headers()
                for event in events:
                    self.wfile.write(f"data:{json.dumps(event, ensure_ascii=False)}\n\n".encode())
                    self.wfile.flush()
                if done:
                    self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def _handle(self, method: str) -> None:
                body = self._body() if method == "POST" else None
                fake.requests.append(
                    Seen(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                if fake.delay:
                    time.sleep(fake.delay)
                if fake.api_key and self.path in PROTECTED:
                    given = self.headers.get("authorization", "")
                    if given.lower() != f"bearer {fake.api_key}".lower():
                        self._send(401)  # TGI: 401 with an empty body
                        return
                if fake.queued and self.path not in ("/health", "/info"):
                    status, payload, headers = fake.queued.pop(0)
                    self._send(status, payload, headers)
                    return
                route = (method, self.path)
                if route in (("GET", "/health"), ("GET", "/")):
                    if fake.ready:
                        self._send(200)
                    else:
                        self._send(503, {"error": "unhealthy", "error_type": "healthcheck"})
                elif route == ("GET", "/info"):
                    self._send(200, fake.info())
                elif route == ("GET", "/v1/models"):
                    self._send(
                        200,
                        {
                            "object": "list",
                            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": MODEL_ID}],
                        },
                    )
                elif route in (("POST", "/"), ("POST", "/generate"), ("POST", "/generate_stream")):
                    if self.path == "/generate_stream" or (self.path == "/" and body.get("stream")):
                        self._sse(fake.generate_events(body), done=False)
                    else:
                        status, payload = fake.generate(body)
                        # compat_generate wraps the answer in a list (the Inference API's shape).
                        self._send(status, [payload] if self.path == "/" and status == 200 else payload)
                elif route == ("POST", "/v1/chat/completions"):
                    status, payload = fake.chat(body)
                    if status == 200 and body.get("stream"):
                        self._sse(payload, done=True)
                    else:
                        self._send(status, payload)
                elif route == ("POST", "/tokenize"):
                    words = body["inputs"].split()
                    self._send(
                        200, [{"id": i, "text": w, "start": 0, "stop": 0} for i, w in enumerate(words)]
                    )
                elif route == ("POST", "/chat_tokenize"):
                    text = fake.chat_prompt(body["messages"])
                    words = text.split()
                    self._send(
                        200,
                        {
                            "tokenize_response": [
                                {"id": i, "text": w, "start": 0, "stop": 0} for i, w in enumerate(words)
                            ],
                            "templated_text": text,
                        },
                    )
                else:
                    self._send(404)

        return Handler
