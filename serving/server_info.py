"""Which server is at a URL, what it calls its model, and how many tokens it accepts per request.

Each backend recognises its own server (serving.backends): TGI by GET /info, the OpenAI-
compatible servers by the `owned_by` of their GET /v1/models cards, and any other
OpenAI-compatible server as "openai" (chat works, limits unknown).
"""

from __future__ import annotations

from serving.backends import BACKENDS, get_backend
from serving.backends.base import ServerInfo
from serving.errors import NotFoundError, RequestRejectedError, ServerError
from serving.transport import NO_RETRY, Transport


def discover(transport: Transport, backend: str = "auto") -> ServerInfo:
    """Ask the server what it is. `backend` skips the guessing (tgi, vllm, local, openai)."""
    url = transport.base_url
    candidates = list(BACKENDS.values()) if backend == "auto" else [get_backend(backend)]
    for b in (b for b in candidates if b.info_route):
        try:
            info = transport.get_json(b.info_route, retry=NO_RETRY)
        except (NotFoundError, RequestRejectedError):
            if backend != "auto":
                raise
            continue
        found = b.from_info(url, info) if isinstance(info, dict) else None
        if found is not None:
            return found
        if backend != "auto":
            raise ServerError(
                f"{url}{b.info_route} does not look like {b.title}'s: {str(info)[:200]}", url=url
            )
    listing = transport.get_json("/v1/models", retry=NO_RETRY)
    listing = listing if isinstance(listing, dict) else {}
    for b in candidates:
        found = b.from_models(url, listing, forced=backend != "auto")
        if found is not None:
            return found
    raise ServerError(
        f"{url}: cannot tell which server this is from /v1/models: {str(listing)[:200]}", url=url
    )
