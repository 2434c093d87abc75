"""The project's local CPU server (serving.local_server): `transformers serve` behind an OpenAI front.

It answers like vLLM (OpenAI routes, max_model_len on /v1/models, POST /tokenize), lists its
model as owned by OWNER, and serves one merged model: no adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

from serving.backends.base import Backend, ServerInfo
from serving.errors import InvalidParameterError

OWNER = "qlora-stack"  # the owned_by of its /v1/models card


class LocalServer(Backend):
    name = "local"
    title = "the local server"
    owned_by = OWNER
    tokenize_route = "/tokenize"

    def check_adapter(
        self, adapter: str, info: ServerInfo, known: Sequence[str] | None, url: str
    ) -> str | None:
        raise InvalidParameterError(
            f"{self.title} at {url} serves one merged model; adapter_id needs TGI with LORA_ADAPTERS "
            "(or vLLM with LoRA modules)"
        )
