"""What `serve` prints once a server takes requests: what it serves, where, its limit, how to try it.

One layout for the three CPU servers (the local server, llama.cpp's, vLLM's CPU engine). The URL is
the one a client uses: the address the server listens on, with a wildcard address (0.0.0.0, ::)
shown as this machine's loopback, or SERVE_PUBLIC_URL where that is set. Compose sets it to the host
address and port it publishes the container's port on, since inside a container the server listens
on 0.0.0.0 and on a port that need not be the published one.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence

ROUTES = "OpenAI-compatible: /v1/models, /v1/chat/completions, /v1/completions"


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a server listening on host:port."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def public_url(url: str) -> str:
    """The URL to print for a server this machine reaches at `url` (see the module's docstring)."""
    public = (os.environ.get("SERVE_PUBLIC_URL") or "").strip().rstrip("/")
    if not public:
        return url
    parts = urllib.parse.urlsplit(public)
    if parts.hostname in ("0.0.0.0", "::") and parts.port:  # published on all the host's addresses
        return local_url(parts.hostname, parts.port)
    return public


def ready_banner(
    *,
    served_name: str,
    path: object,
    engine: str,
    url: str,
    limit: int,
    limit_source: str,
    api_key: bool,
    details: Sequence[tuple[str, str]] = (),
) -> str:
    """`path`: the model served; `engine`: what serves it, and where; `details`: (label, line) pairs the
    user should read, such as the adapters to pick from."""
    url = public_url(url)
    auth = ' -H "Authorization: Bearer $API_KEY"' if api_key else ""
    body = f'{{"model": "{served_name}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'
    return "\n".join(
        [
            f"Serving '{served_name}' ({path}) with {engine}",
            f"  URL     {url}  ({ROUTES})",
            f"  limit   {limit} tokens per request, prompt + answer, from {limit_source}",
            *(f"  {label:<7} {line}" for label, line in details),
            f"  try     curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
            f"            -d '{body}'",
            f'  or      make chat PROMPT="Hello"   (SERVE_URL={url})',
            "Ctrl-C stops it.",
        ]
    )
