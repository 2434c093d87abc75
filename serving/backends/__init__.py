"""The serving backends, one module each, behind one protocol (serving.backends.base.Backend).

BACKENDS is the registry: `python -m serving`, the client's recognition of a server at a
URL (in this order: the first that recognises the server wins, `openai` last), `launch-env`
and the merge's readiness check look backends up here. `vllm-cpu` is vLLM's own server started on
this machine's CPU (`python -m serving serve`): it answers as vLLM, so the `vllm` entry before it
recognises it at a URL.
"""

from __future__ import annotations

from serving.backends.base import Backend
from serving.backends.llamacpp import LlamaCpp
from serving.backends.local import LocalServer
from serving.backends.openai import OpenAICompatible
from serving.backends.tgi import TGI
from serving.backends.vllm import VLLM
from serving.backends.vllm_cpu import VLLMCPU
from serving.errors import InvalidParameterError

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (TGI(), VLLM(), VLLMCPU(), LocalServer(), LlamaCpp(), OpenAICompatible())
}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise InvalidParameterError(f"unknown backend {name!r}; one of: {', '.join(BACKENDS)}") from None
