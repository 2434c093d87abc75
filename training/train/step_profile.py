"""Where a training step's time goes: torch.profiler over a few optimizer steps (train --profile N).

The steps profiled are the session's second to (N+1)th: the first also pays for CUDA kernel
selection, allocator growth and compilation, as in the throughput figures. Written to the run's
profile/ folder by the main process, each file atomically:

  ops.txt         torch's per-operator table, sorted by self time on the device that computes
                  (CUDA kernels and the operators that launched them on a GPU, CPU operators on
                  the CPU), under a header with the steps, their wall time and, on a GPU, how
                  much of it the device was busy: a GPU idle for much of a step is waiting on
                  Python, launches or the host, which no kernel speeds up
  trace.json.gz   the timeline, for Perfetto (ui.perfetto.dev) or chrome://tracing

The profiler slows the steps it records; run.json names them (metrics.profiled_steps) so their
tokens/s is read with that in mind.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from training.atomic import write_text

log = logging.getLogger(__name__)

OPS = "ops.txt"
TRACE = "trace.json.gz"
TABLE_ROWS = 40


class StepProfiler(TrainerCallback):
    """Profile `steps` optimizer steps after the session's first, then write `out_dir` (if `write`)."""

    def __init__(self, steps: int, out_dir: Path, *, cuda: bool, write: bool = True) -> None:
        if steps < 1:
            raise ValueError(f"steps to profile must be at least 1, not {steps}")
        self.steps, self.out_dir, self.cuda, self.write = steps, Path(out_dir), cuda, write
        self.session_start = 0  # the step this session started from (0, or a checkpoint's)
        self.recorded = 0
        self._profiler: profile | None = None
        self._started = 0.0

    @property
    def first(self) -> int:
        """The first step profiled (1-based, as the Trainer's logs count them): the session's second."""
        return self.session_start + 2

    @property
    def profiled_steps(self) -> list[int]:
        return list(range(self.first, self.first + self.recorded))

    def on_train_begin(self, args, state, control, **kwargs):
        self.session_start = state.global_step  # a resumed session starts after its checkpoint's step
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self._profiler is None and self.recorded == 0 and state.global_step + 1 == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._profiler = profile(activities=activities)
            self._sync()
            self._started = time.perf_counter()
            self._profiler.start()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._profiler is not None:
            self.recorded += 1
            if self.recorded == self.steps:
                self._finish()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._profiler is not None:  # the run ended (or was stopped) before N steps were recorded
            self._finish()
        elif self.recorded == 0:
            log.warning(
                "--profile: nothing profiled; this session trained %d step(s), and profiling starts at its second",
                state.global_step - self.session_start,
            )
        return control

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _finish(self) -> None:
        self._sync()
        wall = time.perf_counter() - self._started
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        if not self.write:
            return
        write_text(self.out_dir / OPS, ops_report(profiler, self.profiled_steps, wall, cuda=self.cuda))
        _write_trace(profiler, self.out_dir / TRACE)
        log.info(
            "Profile of %s written to %s (%s: per-operator table; %s: timeline for ui.perfetto.dev)",
            _span(self.profiled_steps),
            self.out_dir,
            OPS,
            TRACE,
        )


def ops_report(profiler: profile, steps: list[int], wall_seconds: float, *, cuda: bool) -> str:
    """The header (steps, wall time, device busy time) and torch's per-operator table."""
    events = profiler.events()
    per_step = wall_seconds / max(len(steps), 1)
    lines = [
        f"{len(steps)} training step(s), {_span(steps)}: {wall_seconds:.3f} s wall, {per_step:.3f} s a step"
    ]
    if cuda:
        busy = device_busy_seconds(events)
        lines.append(
            f"GPU kernels: {busy:.3f} s, {busy / wall_seconds:.0%} of the wall time (kernels on several "
            "streams at once count each); the rest the GPU waited on the host"
        )
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines.append(f"sorted by {sort_by}; the {TABLE_ROWS} largest rows")
    table = events.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=70)
    return "\n".join(lines) + "\n\n" + table + "\n"


def device_busy_seconds(events) -> float:
    """Seconds of device kernels: what torch's table totals as "Self CUDA time total"."""
    total_us = sum(
        e.self_device_time_total
        for e in events
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation
    )
    return total_us / 1e6


def _write_trace(profiler: profile, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".trace-") as tmp:
        raw, packed = Path(tmp) / "trace.json", Path(tmp) / TRACE
        profiler.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(packed, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        packed.replace(target)


def _span(steps: list[int]) -> str:
    if not steps:
        return "none"
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
