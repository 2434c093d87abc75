"""This stack's Throughput callback inside a peer's environment, writing its figures for the bench.

The class is loaded from training/train/throughput.py by path ($BENCH_THROUGHPUT), so the
peers are timed by the same code as the recipe, without importing this stack or its
dependencies. At the end of training the main process writes its figures as JSON to
$PEER_RESULT (on a GPU with its peak CUDA memory, so that the bench compares like with like).
"""

from __future__ import annotations

import importlib.util
import json
import os

_spec = importlib.util.spec_from_file_location("bench_throughput", os.environ["BENCH_THROUGHPUT"])
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


class PeerThroughput(_module.Throughput):
    def on_train_begin(self, args, state, control, **kwargs):
        # Count data tokens as this stack's runs do (attention_mask sum per batch); the Trainer reads
        # the setting at every step, so switching it on here works whatever the tool's config says.
        args.include_num_input_tokens_seen = "non_padding"
        return super().on_train_begin(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        control = super().on_train_end(args, state, control, **kwargs)
        if state.is_world_process_zero:
            with open(os.environ["PEER_RESULT"], "w", encoding="utf-8") as f:
                json.dump({**self.as_dict(), **_gpu_figures()}, f)
        return control


def _gpu_figures() -> dict:
    """On a GPU, its name and the peak CUDA memory allocated, as the bench records for the recipe."""
    import torch  # the peer's own

    if not torch.cuda.is_available():
        return {}
    return {"peak_cuda_bytes": torch.cuda.max_memory_allocated(), "gpu": torch.cuda.get_device_name()}
