"""Which server is at a URL, what it calls its model, and how many tokens it accepts per request.

TGI answers GET /info (max_input_tokens, max_total_tokens, max_stop_sequences). vLLM and
the local server list their model on GET /v1/models with max_model_len, told apart by
`owned_by`. Any other OpenAI-compatible server is "openai": chat works, limits unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.errors import NotFoundError, RequestRejectedError, ServerError
from serving.openai_front import OWNER
from serving.transport import NO_RETRY, Transport

BACKEND_NAMES = {"tgi": "TGI", "vllm": "vLLM", "local": "the local server", "openai": "the server"}


@dataclass(frozen=True)
class ServerInfo:
    backend: str
    url: str
    model: str
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_stop_sequences: int | None = None
    version: str | None = None
    adapters: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return BACKEND_NAMES.get(self.backend, self.backend)


def _from_tgi(url: str, info: dict[str, Any]) -> ServerInfo:
    return ServerInfo(
        backend="tgi",
        url=url,
        model=str(info.get("model_id", "tgi")),
        max_input_tokens=info.get("max_input_tokens"),
        max_total_tokens=info.get("max_total_tokens"),
        max_stop_sequences=info.get("max_stop_sequences"),
        version=info.get("version"),
        raw=info,
    )


def _from_models(url: str, listing: dict[str, Any], forced: str | None) -> ServerInfo:
    cards = [c for c in listing.get("data") or [] if isinstance(c, dict) and c.get("id")]
    if not cards:
        raise ServerError(f"{url}/v1/models lists no model, so there is nothing to send requests to", url=url)
    bases = [c for c in cards if not c.get("parent")] or cards
    base = bases[0]
    owner = base.get("owned_by")
    backend = forced or ("vllm" if owner == "vllm" else "local" if owner == OWNER else "openai")
    length = base.get("max_model_len")
    length = length if isinstance(length, int) and length > 1 else None
    return ServerInfo(
        backend=backend,
        url=url,
        model=str(base["id"]),
        max_input_tokens=length - 1 if length else None,
        max_total_tokens=length,
        adapters=tuple(str(c["id"]) for c in cards if c.get("parent")),
        raw=listing,
    )


def discover(transport: Transport, backend: str = "auto") -> ServerInfo:
    """Ask the server what it is. `backend` skips the guessing (tgi, vllm, local, openai)."""
    url = transport.base_url
    if backend in ("auto", "tgi"):
        try:
            info = transport.get_json("/info", retry=NO_RETRY)
        except (NotFoundError, RequestRejectedError):
            if backend == "tgi":
                raise
        else:
            if isinstance(info, dict) and "max_total_tokens" in info:
                return _from_tgi(url, info)
            if backend == "tgi":
                raise ServerError(f"{url}/info does not look like TGI's: {str(info)[:200]}", url=url)
    listing = transport.get_json("/v1/models", retry=NO_RETRY)
    return _from_models(
        url, listing if isinstance(listing, dict) else {}, None if backend == "auto" else backend
    )
