"""What the local server refuses before `transformers serve` sees a request: 400s that say why, as vLLM does.

transformers serve logs and then ignores the OpenAI fields it cannot honour (`n`, `logprobs`,
`echo`, ...) and drops message content parts that are not text, so a client asking for
three choices, or for log-probabilities, or about an image, gets one plain answer and no
sign that anything was left out. vLLM refuses what it cannot do with a 400 that names the
parameter (the validators of vllm/entrypoints/openai/*/protocol.py, 0.32). The front does
the same: each field below is refused unless it has its neutral value (n=1, logprobs=false,
...), which clients such as the `openai` package may send on every request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RequestError(Exception):
    """A request the front answers itself with `status` and an OpenAI-shaped error body."""

    def __init__(
        self, status: int, message: str, error_type: str = "BadRequestError", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.error_type, self.param = status, error_type, param


def _neutral(*allowed: Any) -> Callable[[Any], bool]:
    """Accepts None and exactly these values (True is not 1 here, as JSON has it)."""
    return lambda v: v is None or any(type(v) is type(a) and v == a for a in allowed)


# field: (values the server can honour, what it cannot do and what to do instead)
SHARED = {
    "n": (
        _neutral(1),
        "the local server generates one choice per request: send separate requests (vLLM samples n choices)",
    ),
    "presence_penalty": (
        _neutral(0, 0.0),
        "the local server has no presence penalty: use repetition_penalty (> 1 discourages repeats)",
    ),
}
CHAT = {
    **SHARED,
    "logprobs": (_neutral(False), "the local server returns no log-probabilities (vLLM does)"),
    "top_logprobs": (_neutral(0), "the local server returns no log-probabilities (vLLM does)"),
    "response_format": (
        lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
        "the local server cannot constrain the answer to JSON: only type 'text'",
    ),
    "modalities": (lambda v: v is None or v == ["text"], "the local server answers in text only"),
    "audio": (_neutral(), "the local server answers in text only"),
    "prediction": (_neutral(), "the local server takes no predicted output"),
}
COMPLETIONS = {
    **SHARED,
    "best_of": (_neutral(1), "the local server generates one sequence per request"),
    "logprobs": (_neutral(), "the local server returns no log-probabilities (vLLM does)"),
    "echo": (_neutral(False), "the local server does not echo the prompt: prepend it yourself"),
}
UNSUPPORTED = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS}
# The content part types transformers serve reads as text; for a text model it joins them with spaces.
TEXT_PARTS = ("text", "input_text", "output_text")


def refuse_unsupported(route: str, body: dict[str, Any]) -> None:
    for name, (honoured, why) in UNSUPPORTED.get(route, {}).items():
        value = body.get(name)
        if not honoured(value):
            raise RequestError(400, f"{name}={value!r} is not supported: {why}.", param=name)


def text_message(message: Any, index: int) -> dict[str, Any]:
    """A chat message with its content as the text the model reads; anything else is a 400."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError(400, f"{where} must be an object with a role and content", param="messages")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return {**message, "content": content or ""}
    if not isinstance(content, list):
        raise RequestError(
            400, f"{where}.content must be a string or a list of content parts", param="messages"
        )
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise RequestError(
                400, f"{at} must be a content part: {{'type': 'text', 'text': ...}}", param="messages"
            )
        if part.get("type") not in TEXT_PARTS:
            raise RequestError(
                400,
                f"{at} has type {part.get('type')!r}; the model served here reads text only: "
                "send content parts of type 'text'",
                param="messages",
            )
        if not isinstance(part.get("text"), str):
            raise RequestError(400, f"{at}: a text part needs a string 'text'", param="messages")
        texts.append(part["text"])
    return {**message, "content": " ".join(texts)}
