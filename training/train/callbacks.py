"""The Trainer callbacks a run installs: graceful stop on SIGTERM/Ctrl-C, and throughput."""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from transformers import TrainerCallback

from training.train.distributed import Ranks, max_over_ranks

log = logging.getLogger(__name__)


class GracefulStop(TrainerCallback):
    """SIGTERM (docker stop) or Ctrl-C: finish the step, save a checkpoint, stop.

    A second signal stops at once. With several processes, the launcher passes the signal on to
    each, but they may get it in different steps; after every step they agree (the largest
    signal number of any rank), so all of them save the same step and none waits for the others
    in a collective that never comes.
    """

    def __init__(self, world: Ranks | None = None) -> None:
        self.signum: int | None = None
        self.world = world or Ranks()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.world.is_main:
            log.warning(
                "%s received: saving a checkpoint after the current step, then stopping "
                "(send it again to stop at once)",
                signal.Signals(signum).name,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.world.world_size > 1:
            agreed = max_over_ranks(self.signum or 0, args.device)
            if agreed and self.signum is None:
                self.signum = agreed  # another rank (maybe on another machine) was signalled
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


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
