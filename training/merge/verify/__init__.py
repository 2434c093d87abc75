"""Check a merge: the merged model must compute what base + adapter computes.

Both models see the same probe prompts (rendered with the model's chat template); their
logits must agree within the output dtype's rounding (probes.TOLERANCE). Two ways, the
merge's `verify` setting:
- streamed (default): one decoder layer in memory at a time, logits at every prompt
  position and the next token after each prompt (streamed.py);
- full: both models loaded whole through from_pretrained, plus greedy continuations and,
  for the NF4 round trip, bitsandbytes' 4-bit layers as the reference (full.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from training.merge.adapters import Adapter
from training.merge.nf4 import RoundTrip
from training.merge.verify.full import verify_full
from training.merge.verify.layerwise import LayerwiseUnsupported
from training.merge.verify.probes import MergeVerificationError
from training.merge.verify.streamed import verify_streamed

log = logging.getLogger(__name__)

MODES = ("streamed", "full", "off")

__all__ = ["MODES", "MergeVerificationError", "verify_merge"]


def verify_merge(
    mode: str,
    base_dir: Path,
    adapter: Adapter,
    merged_dir: Path,
    dtype: torch.dtype,
    round_trip: RoundTrip | None = None,
) -> dict:
    """The verification's figures, with `mode` (the one that ran) and `seconds`.

    Raises MergeVerificationError when the merged model disagrees with base + adapter.
    """
    started = time.perf_counter()
    record: dict = {"mode": mode}
    if mode == "streamed":
        try:
            record.update(verify_streamed(base_dir, adapter, merged_dir, dtype, round_trip))
        except LayerwiseUnsupported as e:
            log.warning("Verifying with the whole model in memory: the streamed check cannot run it (%s)", e)
            record = {"mode": "full", "fallback_reason": f"the streamed check cannot run this model: {e}"}
    if record["mode"] == "full":
        record.update(verify_full(base_dir, adapter, merged_dir, dtype, round_trip))
    record["seconds"] = round(time.perf_counter() - started, 2)
    return record
