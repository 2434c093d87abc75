"""Settle oneMKL's vector-math dispatch on one thread, before torch calls it from several.

torch's CPU wheels (2.13 bundles oneMKL 2024.2) send contiguous float unary ops (cos, sin,
exp, sqrt, ...) to MKL's VML, called from every intra-op thread on its own chunk. oneMKL
picks each VML function's kernel on that function's first call; when the first call runs on
several threads at once, one thread may run a low-accuracy kernel for its whole chunk of
that call (pytorch/pytorch#188792; no longer seen from oneMKL 2025.0). Seen here:
- the rotary cos of the streamed merge verification's first forward off by 1.5e-4 in about
  one process in ten, which failed correct merges;
- vLLM's rotary cos/sin table, computed once when its CPU engine builds the model, on the
  engine's threads (all cores but one), off by 1.5e-4 in 2 of 40 processes on two threads
  (bench/mkl_vml_race.py --engine vllm): every answer of that server's life uses it.
One call of each function on a one-element tensor, on this thread, settles its dispatch for
every later call from any thread.

Here, in serving, because both stages need it and training may import serving (not the reverse):
the training, merge, export and evaluation processes and the local server call warm_up();
vLLM's processes call vllm_plugin(), registered in pyproject.toml as a vLLM general plugin,
which vLLM loads in each process it starts (API server, engine core, workers) before the
model is built.
"""

from __future__ import annotations

import functools
import logging

import torch

# torch's names of the ops ATen routes to VML: IMPLEMENT_VML_MKL in ATen/cpu/vml.h (torch 2.13),
# each for float32 and float64.
VML_FUNCTIONS = (
    "acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp",
    "log", "log10", "log2", "sin", "sqrt", "tan", "tanh", "trunc",
)  # fmt: skip


@functools.cache
def warm_up() -> bool:
    """Call every VML-routed op once per dtype on the calling thread (well under a millisecond);
    False where torch has no oneMKL (aarch64 builds), so there is nothing to settle.

    Called where work that computes on the CPU starts (training, merge, export, evaluation, the
    local server), not when the package is imported: that would cost `--help` and argument
    errors the 2 s of importing torch.
    """
    if not torch.backends.mkl.is_available():
        return False
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in VML_FUNCTIONS:
            getattr(torch, name)(x)
    return True


def vllm_plugin() -> None:
    """vLLM's general-plugin hook (entry point group vllm.general_plugins): warm_up(), logged once per
    process under vLLM's own logger, so its server log shows which of its processes ran it."""
    if not warm_up():
        return
    # A child of vLLM's "vllm" logger: vLLM's handler and format, and the process prefix it adds.
    logging.getLogger("vllm.qlora_stack").info(
        "oneMKL vector math settled on one thread before the model loads (pytorch/pytorch#188792)"
    )
