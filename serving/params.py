"""Generation parameters: checked once, before sending; OpenAI's way of writing them (backends adapt it).

One set of meanings for every server: temperature 0 is greedy decoding, top_p 1.0 means
no nucleus sampling. The backends disagree on how to say that. TGI's /generate rejects
temperature 0 and top_p 1.0 and turns sampling on whenever a sampling knob is present,
even with do_sample false; its chat route maps temperature 0 to greedy but samples when
temperature is left out. vLLM and the local server take OpenAI's fields, with top_k and
repetition_penalty as extra fields.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from serving.errors import InvalidParameterError

UINT64_MAX = 2**64 - 1
# The most new tokens an answer gets when the caller leaves max_new_tokens unset: the client
# then asks for what the server's context leaves after the prompt, up to this many.
AUTO_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and how. Defaults: greedy decoding, and an automatic length.

    max_new_tokens=None (the default) lets the client choose per request: all that the
    server's context leaves after the prompt, at most AUTO_MAX_NEW_TOKENS. A number is
    used as given, and refused before sending when prompt + answer cannot fit.
    """

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))
        _check(self)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def nucleus(self) -> bool:
        """Whether top_p actually restricts anything (1.0 is the same as unset)."""
        return self.top_p is not None and self.top_p < 1.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(p: SamplingParams) -> None:
    if p.max_new_tokens is not None and (not _is_int(p.max_new_tokens) or p.max_new_tokens < 1):
        raise InvalidParameterError(
            f"max_new_tokens must be a whole number >= 1, got {p.max_new_tokens!r} (or None: what the "
            f"server's context leaves after the prompt, at most {AUTO_MAX_NEW_TOKENS})"
        )
    if not _is_number(p.temperature) or p.temperature < 0:
        raise InvalidParameterError(
            f"temperature must be a number >= 0 (0 = greedy decoding, > 0 = sampling), got {p.temperature!r}"
        )
    if p.top_p is not None and (not _is_number(p.top_p) or not 0 < p.top_p <= 1):
        raise InvalidParameterError(
            f"top_p must be in (0, 1], got {p.top_p!r}; TGI's /generate needs top_p < 1: leave it unset "
            "(or 1.0, which the client drops) for no nucleus sampling"
        )
    if p.top_k is not None and (not _is_int(p.top_k) or p.top_k < 1):
        raise InvalidParameterError(
            f"top_k must be a whole number >= 1 (or unset for no limit), got {p.top_k!r}"
        )
    if p.repetition_penalty is not None and (
        not _is_number(p.repetition_penalty) or p.repetition_penalty <= 0
    ):
        raise InvalidParameterError(
            f"repetition_penalty must be > 0 (1.0 = no penalty), got {p.repetition_penalty!r}"
        )
    if not p.sampling and (p.nucleus or p.top_k is not None):
        knob = "top_p" if p.nucleus else "top_k"
        raise InvalidParameterError(
            f"{knob} only applies when sampling: set temperature > 0, or leave {knob} unset for greedy "
            "decoding (temperature 0). TGI would otherwise switch to sampling without saying so."
        )
    for s in p.stop:
        if not isinstance(s, str) or not s:
            raise InvalidParameterError(f"stop must be a list of non-empty strings, got {list(p.stop)!r}")
    if p.seed is not None and (not _is_int(p.seed) or not 0 <= p.seed <= UINT64_MAX):
        raise InvalidParameterError(f"seed must be a whole number in [0, 2**64), got {p.seed!r}")


def openai_chat_fields(p: SamplingParams, *, extras: bool = True) -> dict:
    """Keyword arguments for InferenceClient.chat_completion: OpenAI's fields, vLLM's extras in extra_body."""
    kwargs: dict = {"max_tokens": p.max_new_tokens, "temperature": p.temperature}
    if p.sampling and p.nucleus:
        kwargs["top_p"] = p.top_p
    if p.stop:
        kwargs["stop"] = list(p.stop)
    if p.seed is not None:
        kwargs["seed"] = p.seed
    extra: dict = {}
    if extras and p.sampling and p.top_k is not None:
        extra["top_k"] = p.top_k
    if extras and p.repetition_penalty is not None:
        extra["repetition_penalty"] = p.repetition_penalty
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def openai_completion_fields(p: SamplingParams) -> dict:
    """The body fields of an OpenAI /v1/completions request (vLLM, the local server)."""
    body: dict = {"max_tokens": p.max_new_tokens, "temperature": p.temperature}
    if p.sampling and p.nucleus:
        body["top_p"] = p.top_p
    if p.sampling and p.top_k is not None:
        body["top_k"] = p.top_k
    if p.repetition_penalty is not None:
        body["repetition_penalty"] = p.repetition_penalty
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed
    return body
