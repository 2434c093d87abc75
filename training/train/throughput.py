"""Data tokens per second of training: the measure every run records and the benchmarks compare.

Standalone (the standard library and transformers only): bench/train_throughput.py loads this
file by path inside LLaMA-Factory's and axolotl's own environments, so the peers are timed by
the same code as this stack.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


class Throughput(TrainerCallback):
    """Tokens per second of this session (a resumed run counts only what it trained itself).

    `steady_tokens_per_second` leaves out the first optimizer step, which also pays for
    CUDA kernel selection, allocator growth and torch.compile: on a short run it is the
    figure that predicts a long one.
    """

    def __init__(self) -> None:
        self.start_time = self.end_time = 0.0
        self.start_tokens = self.end_tokens = 0
        self.warm: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.warm is None:
            self.warm = (time.perf_counter(), state.num_input_tokens_seen)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.end_time, self.end_tokens = time.perf_counter(), state.num_input_tokens_seen
        return control

    def as_dict(self) -> dict:
        seconds = self.end_time - self.start_time
        tokens = self.end_tokens - self.start_tokens
        result = {
            "train_seconds": round(seconds, 2),
            "tokens_trained": int(tokens),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "steady_tokens_per_second": None,
        }
        if self.warm is not None and self.end_time > self.warm[0] and self.end_tokens > self.warm[1]:
            steady = (self.end_tokens - self.warm[1]) / (self.end_time - self.warm[0])
            result["steady_tokens_per_second"] = round(steady, 1)
        return result
