"""Any other OpenAI-compatible server: chat and completions work, limits and adapters are unknown."""

from __future__ import annotations

from serving.backends.base import Backend


class OpenAICompatible(Backend):
    name = "openai"
    title = "the server"
    owned_by = None  # recognised last: any /v1/models listing
