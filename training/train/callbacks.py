"""The graceful stop a run installs: SIGTERM/Ctrl-C finish the step and save a checkpoint."""

from __future__ import annotations

import logging
import signal
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
