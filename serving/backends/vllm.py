"""vLLM's OpenAI-compatible server: the second GPU backend (tensor parallelism, LoRA modules).

It lists its model on /v1/models as owned by "vllm" with max_model_len, takes OpenAI's fields
plus top_k and repetition_penalty, counts tokens on POST /tokenize, and serves LoRA adapters
it was started with (--enable-lora --lora-modules) as further /v1/models cards with a parent.
"""

from __future__ import annotations

from collections.abc import Sequence

from serving import tool_calls
from serving.backends.base import Backend, LaunchError, ServerInfo
from serving.errors import InvalidParameterError

IMAGE = "vllm/vllm-openai:v0.33.0"
# Seconds the requests in flight get to finish when the server is asked to stop (SIGTERM, Ctrl-C,
# `docker stop`), as --shutdown-timeout: vLLM's own default, 0, aborts them mid-answer. Below the
# 30 s grace period compose.yaml gives the vllm and vllm-cpu services before a SIGKILL.
SHUTDOWN_TIMEOUT = 20


class VLLM(Backend):
    name = "vllm"
    title = "vLLM"
    image = IMAGE
    owned_by = "vllm"
    tokenize_route = "/tokenize"

    def check_adapter(
        self, adapter: str, info: ServerInfo, known: Sequence[str] | None, url: str
    ) -> str | None:
        if adapter not in info.adapters:
            served = ", ".join(info.adapters) or "none (start vLLM with --enable-lora --lora-modules)"
            raise InvalidParameterError(f"vLLM at {url} serves no adapter {adapter!r}; adapters: {served}")


def choose_tool_call_parser(requested: str | None, chat_template: str | None, notes: list[str]) -> str | None:
    """The parser vLLM starts with for requests that offer tools (serving.tool_calls.choose), with a
    note for the banner; a name vLLM does not know stops here, not after the model has loaded."""
    try:
        parser = tool_calls.choose(requested, chat_template)
    except ValueError as e:
        raise LaunchError(f"--tool-call-parser / TOOL_CALL_PARSER: {e}") from None
    if parser is not None:
        how = (
            "chosen"
            if (requested or tool_calls.AUTO).strip() != tool_calls.AUTO
            else "from the chat template"
        )
        notes.append(
            f"tool calls: requests may offer tools; vLLM reads the model's calls as {parser} ({how})"
        )
    return parser
