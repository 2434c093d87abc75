"""HTTP for the serving client: one connection pool, timeouts, retries, and server errors as exceptions.

The client talks to a server the user runs (TGI, vLLM, the local CPU server), not to the
Hugging Face Hub, so it keeps its own `httpx2.Client` instead of huggingface_hub's shared
session. That session refuses every URL when HF_HUB_OFFLINE=1 is set (common on machines
that serve a local model) and would send the user's Hub token to whatever server the URL
names.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx2

from serving.errors import (
    AuthenticationError,
    NotFoundError,
    OverloadedError,
    RequestRejectedError,
    ServerError,
    ServerTimeoutError,
    ServerUnavailableError,
    ServingError,
)

log = logging.getLogger(__name__)

# Only these mean "the server did not start on your request; ask again later". Other
# failures either will not change on a retry (4xx) or may have done work already (500).
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter on 429 and 503, bounded by an overall deadline.

    Attempt n (from 0) waits a random time in [0, min(max_delay, base_delay * 2**n)], or at
    least what the server's Retry-After asks for. No retry starts after `deadline` seconds
    from the first attempt. The deadline bounds the retrying only: every attempt, the
    first included, waits for an answer as long as the client's timeout says, so a
    timeout the caller set always holds (one generation may take longer than the deadline).
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0
    deadline: float | None = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (1 means no retries)")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("base_delay and max_delay must be >= 0")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError("deadline must be > 0 seconds, or None for no overall deadline")

    def delay(
        self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        cap = min(self.max_delay, self.base_delay * (2**attempt))
        wait = (rng or random).uniform(0, cap)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay))
        return wait


NO_RETRY = RetryPolicy(max_attempts=1, deadline=None)


def _retry_after_seconds(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_error_body(body: bytes | str) -> tuple[str | None, str | None]:
    """(message, type) from the error bodies of TGI, vLLM, FastAPI and OpenAI-style servers.

    TGI: {"error": "...", "error_type": "validation"}; vLLM/OpenAI: {"error": {"message",
    "type", "code"}}; FastAPI (transformers serve): {"detail": "..."} or a list of field
    errors; TGI in chat streams: {"error": {"message", "http_status_code"}}.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = text.strip()
    if not text:
        return None, None
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:2000], None
    if not isinstance(payload, dict):
        return text[:2000], None
    error = payload.get("error")
    if isinstance(error, dict):
        message = error.get("message") or json.dumps(error)
        return str(message), error.get("type") or payload.get("error_type")
    if error is not None:
        return str(error), payload.get("error_type")
    detail = payload.get("detail")
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts), "validation"
    if detail is not None:
        return str(detail), None
    if "message" in payload:
        return str(payload["message"]), payload.get("type")
    return text[:2000], None


def error_for_status(status: int, body: bytes | str, url: str, server: str = "the server") -> ServingError:
    """The exception for an HTTP error answer, carrying the server's own message and type."""
    message, error_type = parse_error_body(body)
    said = f": {message}" if message else " (no message)"
    kind = f" {error_type}" if error_type else ""
    text = f"{server} at {url} answered {status}{kind}{said}"
    fields = {"url": url, "status": status, "error_type": error_type, "server_message": message}
    if status in (401, 403):
        # No --api-key option on purpose: a key on the command line shows in `ps` and shell history.
        hint = (
            " Set the API key the server was started with: the API_KEY environment variable (or .env) "
            "for the command line, api_key= for the Python client."
        )
        return AuthenticationError(text + "." + hint, **fields)
    if status == 404:
        return NotFoundError(text, **fields)
    if status == 429:
        return OverloadedError(text, **fields)
    if 400 <= status < 500 and status != 424:
        return RequestRejectedError(text, **fields)
    return ServerError(text, **fields)


def error_from_event(payload: dict, url: str, server: str = "the server") -> ServingError | None:
    """The exception for an error event inside a stream (servers answer 200, then report failures)."""
    if payload.get("error") is None:
        return None
    error = payload["error"]
    status = None
    if isinstance(error, dict):
        status = error.get("http_status_code") or error.get("code")
    message, error_type = parse_error_body(json.dumps(payload))
    error_type = error_type or payload.get("error_type")
    if isinstance(status, int):
        return error_for_status(status, json.dumps(payload), url, server)
    if error_type == "overloaded":
        cls: type[ServingError] = OverloadedError
    elif error_type == "validation":
        cls = RequestRejectedError
    else:
        cls = ServerError
    kind = f" ({error_type})" if error_type else ""
    return cls(
        f"{server} at {url} failed during the stream{kind}: {message}",
        url=url,
        error_type=error_type,
        server_message=message,
    )


class Transport:
    """Requests to one server: auth header, timeouts, retries on 429/503, errors as exceptions."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        retry: RetryPolicy = RetryPolicy(),
        server_name: str = "the server",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.server_name = server_name
        self.auth_headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx2.Client(follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}/{path.lstrip('/')}"

    def _timeout(self, read: float | None) -> httpx2.Timeout:
        read = self.timeout if read is None else read
        return httpx2.Timeout(read, connect=min(self.connect_timeout, read))

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> httpx2.Response:
        """Send, retrying 429/503 as the policy says. Raises a ServingError for any failure.

        With stream=True the response is returned open (status already checked); close it.
        """
        policy = retry or self.retry
        url = self.url(path)
        merged = {**(headers or {}), **self.auth_headers}
        started = time.monotonic()
        attempt = 0
        read_timeout = timeout if timeout is not None else self.timeout
        while True:
            try:
                request = self._client.build_request(
                    method, url, json=json_body, headers=merged, timeout=self._timeout(read_timeout)
                )
                response = self._client.send(request, stream=True)
                if not stream or response.status_code >= 400:
                    try:
                        response.read()
                    finally:
                        response.close()
            except httpx2.TimeoutException as e:
                raise ServerTimeoutError(
                    f"{self.server_name} at {url} did not answer within {read_timeout:.1f} s "
                    f"({type(e).__name__}). A long generation may need a larger timeout, or stream=True.",
                    url=url,
                ) from e
            except (httpx2.ConnectError, httpx2.ProxyError, httpx2.UnsupportedProtocol) as e:
                raise ServerUnavailableError(
                    f"no server answered at {url} ({type(e).__name__}: {e}). Is it running? "
                    "Start one with `make serve`, or check the URL (SERVE_URL / --url).",
                    url=url,
                ) from e
            except httpx2.TransportError as e:
                # Connected, then the connection was reset or closed mid-request: the server is
                # there, and its log says what went wrong (e.g. it failed while generating).
                raise ServerUnavailableError(
                    f"{self.server_name} at {url} closed the connection before answering "
                    f"({type(e).__name__}: {e}); its log may say why",
                    url=url,
                ) from e

            if response.status_code < 400:
                return response
            error = error_for_status(response.status_code, response.content, url, self.server_name)
            if response.status_code not in RETRY_STATUSES or attempt + 1 >= policy.max_attempts:
                if attempt:
                    error.args = (f"{error.args[0]} (gave up after {attempt + 1} attempts)",)
                raise error
            wait = policy.delay(attempt, _retry_after_seconds(response))
            elapsed = time.monotonic() - started
            if policy.deadline is not None and elapsed + wait >= policy.deadline:
                raise ServerTimeoutError(
                    f"{error.args[0]}; still refused after {attempt + 1} attempts in {elapsed:.1f} s, "
                    f"and the next retry would pass the {policy.deadline:g} s deadline",
                    url=url,
                    status=error.status,
                    error_type=error.error_type,
                    server_message=error.server_message,
                ) from error
            log.info("%s answered %d; retry %d in %.2f s", url, response.status_code, attempt + 1, wait)
            time.sleep(wait)
            attempt += 1

    def get_json(self, path: str, *, retry: RetryPolicy | None = None, timeout: float | None = None) -> Any:
        response = self.request("GET", path, retry=retry, timeout=timeout)
        return _json(response, self.url(path))

    def post_json(self, path: str, body: Any, *, timeout: float | None = None) -> Any:
        response = self.request("POST", path, json_body=body, timeout=timeout)
        return _json(response, self.url(path))

    def sse_lines(self, response: httpx2.Response) -> Iterator[str]:
        """The lines of an open SSE response; error events become exceptions; closes the response."""
        url = str(response.request.url)
        try:
            for line in response.iter_lines():
                line = line.strip()
                if line.startswith("data:") and '"error"' in line:
                    error = _stream_error(line, url, self.server_name)
                    if error is not None:
                        raise error
                yield line
        except httpx2.TimeoutException as e:
            raise ServerTimeoutError(
                f"{self.server_name} at {url} sent nothing for {self.timeout:g} s in the middle of a stream",
                url=url,
            ) from e
        except httpx2.TransportError as e:
            raise ServerUnavailableError(
                f"{self.server_name} at {url} closed the stream early ({type(e).__name__}: {e})", url=url
            ) from e
        finally:
            response.close()


def _stream_error(line: str, url: str, server: str) -> ServingError | None:
    data = line[len("data:") :].strip()
    try:
        payload = json.loads(data)
    except ValueError:
        # transformers serve formats its error events with an f-string: quotes in the
        # message make them invalid JSON. Keep the message rather than a parse error.
        if data.startswith('{"error"'):
            return ServerError(f"{server} at {url} failed during the stream: {data}", url=url)
        return None
    return error_from_event(payload, url, server) if isinstance(payload, dict) else None


def _json(response: httpx2.Response, url: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ServerError(
            f"{url} answered {response.status_code} with a body that is not JSON: {response.text[:200]!r}",
            url=url,
            status=response.status_code,
        ) from None
