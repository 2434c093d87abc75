"""llama.cpp's server, as llama-cpp-python 0.3.36 serves it (llama_cpp.server), on a GGUF export.

What it says and wants (llama_cpp/server/app.py and types.py at 0.3.36, checked against a
running server):
- GET /v1/models lists the model under its alias, `"owned_by": "me"` with a `permissions` list,
  and no context length, so the client cannot check limits before sending: a prompt over the
  context is refused (400 context_length_exceeded), a max_tokens over it is not: generation
  stops at the context with finish_reason "length".
- It has no /health. Its routes answer once the model is loaded (the app loads it before it
  listens), so the client's readiness check falls back to /v1/models, with the key.
- Its request defaults differ from OpenAI's and from the other servers': temperature 0.8,
  top_k 40, top_p 0.95, min_p 0.05, and a repeat_penalty of 1.1 that applies even to greedy
  decoding. The backend always says what the client means: repeat_penalty 1.0 unless one is
  asked for, and when sampling, top_k 0 (off), top_p 1.0 and min_p 0 unless set. Its
  repetition penalty is named repeat_penalty and counts the last 64 tokens only.
- It counts tokens on POST /extras/tokenize/count ({"input": text}); chats cannot be counted.
- A malformed request is a 500 (its validation errors are not turned into 4xx); the client
  checks parameters before sending, so such requests do not reach it.
- One request at a time; `--interrupt_requests False` (set by this project) lets a streamed
  answer finish instead of being cut off by the next request.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.backends.base import Backend, ServerInfo
from serving.errors import InvalidParameterError
from serving.params import SamplingParams, openai_chat_fields, openai_completion_fields

if TYPE_CHECKING:
    from serving.transport import Transport

OWNER = "me"  # the owned_by of llama-cpp-python's /v1/models cards
GGUF_DIR = "gguf"  # outputs/<run>/gguf/<run>-<quant>.gguf, as training.run_dir names it
DEFAULT_QUANT = "q4_k_m"


def gguf_path(outputs: Path, run: str, quant: str) -> Path:
    """The GGUF `python -m training export --quant QUANT` writes for RUN."""
    return Path(outputs) / run / GGUF_DIR / f"{run}-{quant}.gguf"


class LlamaCpp(Backend):
    name = "llamacpp"
    title = "llama.cpp"
    owned_by = OWNER
    tokenize_route = "/extras/tokenize/count"

    def from_models(self, url: str, listing: dict[str, Any], *, forced: bool = False) -> ServerInfo | None:
        cards = [c for c in listing.get("data") or [] if isinstance(c, dict)]
        # "me" alone is a weak mark; its cards also carry a permissions list, which OpenAI dropped.
        if not forced and not all(isinstance(c.get("permissions"), list) for c in cards):
            return None
        return super().from_models(url, listing, forced=forced)

    def _defaults(self, p: SamplingParams) -> dict:
        """llama.cpp's own defaults would change what the request means; say each knob."""
        fields: dict = {"repeat_penalty": p.repetition_penalty if p.repetition_penalty is not None else 1.0}
        if p.sampling:
            fields["top_k"] = p.top_k if p.top_k is not None else 0
            fields["min_p"] = 0.0
        return fields

    def chat_fields(self, p: SamplingParams) -> dict:
        kwargs = openai_chat_fields(p, extras=False)
        if p.sampling:
            kwargs["top_p"] = p.top_p if p.nucleus else 1.0
        kwargs["extra_body"] = self._defaults(p)
        return kwargs

    def raw_fields(self, p: SamplingParams) -> dict:
        body = openai_completion_fields(p)
        body.pop("repetition_penalty", None)
        if p.sampling:
            body["top_p"] = p.top_p if p.nucleus else 1.0
        return {**body, **self._defaults(p)}

    def check_adapter(
        self, adapter: str, info: ServerInfo, known: Sequence[str] | None, url: str
    ) -> str | None:
        raise InvalidParameterError(
            f"{self.title} at {url} serves one GGUF model; adapter_id needs TGI with LORA_ADAPTERS "
            "(or vLLM with LoRA modules)"
        )

    def count_tokens(
        self, transport: Transport, info: ServerInfo, prompt: str | None, messages: list | None
    ) -> int | None:
        if messages is not None:
            return None  # it renders chat templates only inside a chat request
        return int(transport.post_json(self.tokenize_route, {"model": info.model, "input": prompt})["count"])
