"""The errors the serving client raises: one family, each naming what went wrong and where.

Every error carries what the server said (`server_message`, `error_type`, `status`) when
there was a server to say something, so a caller can branch on the kind of failure and
a person reading the message learns what to change.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class of every error raised by `serving`."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        error_type: str | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.error_type = error_type
        self.server_message = server_message


class InvalidParameterError(ServingError, ValueError):
    """A generation parameter was refused before anything was sent."""


class LimitExceededError(InvalidParameterError):
    """The prompt or max_new_tokens exceeds what the server accepts; nothing was sent."""


class ServerUnavailableError(ServingError):
    """No server answered at the URL (refused, unreachable, or closed the connection)."""


class ServerTimeoutError(ServingError, TimeoutError):
    """The server did not answer in time, or retries ran past the overall deadline."""


class RequestRejectedError(ServingError):
    """The server refused the request (4xx): the message says why."""


class AuthenticationError(RequestRejectedError):
    """401/403: the API key is missing or wrong."""


class NotFoundError(RequestRejectedError):
    """404: no such route or model on this server."""


class OverloadedError(ServingError):
    """429: the server is at its concurrency limit (and retries did not get through)."""


class ServerError(ServingError):
    """5xx, or 424 (TGI's generation error): the server failed while handling the request."""


class UnknownAdapterWarning(UserWarning):
    """An adapter id that TGI may not know: TGI then answers with the base model, silently."""
