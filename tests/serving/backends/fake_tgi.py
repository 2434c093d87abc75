"""A small real HTTP server on 127.0.0.1 that answers like TGI 3.3.7.

Request and response shapes, validation messages, error JSON and status codes follow the
router at tag v3.3.7 (router/src/lib.rs: GenerateResponse, Details, StreamResponse,
StreamDetails, ChatCompletion, ChatCompletionChunk, ErrorResponse, Info; router/src/server.rs
and validation.rs for routes, auth and errors). Its "tokenizer" splits on whitespace, and
its "model" answers with the words of `reply`. It records every request for the tests.
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
            "max_stop_sequences": 4,
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

    def validate(self, inputs: str, p: dict) -> tuple[int, dict] | None:
        """TGI's parameter validation (router/src/validation.rs), as 422 validation errors."""

        def error(message: str) -> tuple[int, dict]:
            return 422, {"error": f"Input validation error: {message}", "error_type": "validation"}

        if p.get("temperature") is not None and p["temperature"] <= 0:
            return error("`temperature` must be strictly positive")
        if p.get("top_p") is not None and not 0 < p["top_p"] < 1:
            return error("`top_p` must be > 0.0 and < 1.0")
        if p.get("top_k") is not None and p["top_k"] <= 0:
            return error("`top_k` must be strictly positive")
        if p.get("max_new_tokens") == 0:
            return error("`max_new_tokens` must be strictly positive")
        if len(p.get("stop") or []) > 4:
            return error("`stop` supports up to 4 stop sequences. Given: 5")
        n = len(inputs.split())
        if n > self.max_input:
            return error(f"`inputs` must have less than {self.max_input} tokens. Given: {n}")
        if n + (p.get("max_new_tokens") or 0) > self.max_total:
            return error(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total}. Given: {n} `inputs` tokens and {p['max_new_tokens']} `max_new_tokens`"
            )
        return None

    def tokens(self, max_new: int | None) -> tuple[list[str], str]:
        words = self.reply if max_new is None else self.reply[:max_new]
        return words, ("length" if max_new is not None and max_new < len(self.reply) else "eos_token")

    def generate(self, body: dict) -> tuple[int, dict]:
        p = body.get("parameters") or {}
        failed = self.validate(body.get("inputs", ""), p)
        if failed:
            return failed
        words, finish = self.tokens(p.get("max_new_tokens"))
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
        failed = self.validate(body.get("inputs", ""), p)
        if failed:  # TGI streams validation errors as an event after a 200
            return [failed[1]]
        words, finish = self.tokens(p.get("max_new_tokens"))
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
                    "input_length": 3,
                }
            events.append(
                {
                    "index": i,
                    "token": token,
                    "generated_text": " ".join(words) if last else None,
                    "details": details,
                }
            )
            if self.stream_error and i == 0:
                return [events[0], self.stream_error]
        return events

    def chat(self, body: dict) -> tuple[int, Any]:
        if body.get("temperature") is not None and body["temperature"] != 0 and body["temperature"] < 0:
            return 422, {
                "error": "Input validation error: `temperature` must be strictly positive",
                "error_type": "validation",
            }
        if body.get("top_p") is not None and not 0 < body["top_p"] < 1:
            return 422, {
                "error": "Input validation error: `top_p` must be > 0.0 and < 1.0",
                "error_type": "validation",
            }
        words, finish = self.tokens(body.get("max_tokens"))
        usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
        reason = "stop" if finish == "eos_token" else finish
        if not body.get("stream"):
            return 200, {
                "object": "chat.completion",
                "id": "",
                "created": int(time.time()),
                "model": MODEL_ID,
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
                    "model": MODEL_ID,
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
                if route == ("GET", "/health"):
                    self._send(200)
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
                        self._send(*fake.generate(body))
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
                    text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in body["messages"])
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
