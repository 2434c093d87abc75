"""Measured peak memory of a few real training steps: what the memory estimator is checked against.

On a GPU the measure is torch.cuda.max_memory_allocated: the peak of memory held by live
tensors, as PyTorch's allocator counts it. The CPU has no such counter (process RSS mixes in
the Python heap, libraries and freed-but-cached pages), so on the CPU the same quantity is
counted directly: a TorchDispatchMode sees every tensor an operator creates, and a weakref
finalizer on each storage subtracts it when it is freed.

torch's own MemTracker (torch.distributed._tools.mem_tracker) does this too, but it installs
a gradient hook on every parameter and fails on a model whose base weights are frozen, which
is every LoRA model.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages per device type, while active.

    Tensors alive on entry are found through the garbage collector; everything created
    inside passes through the dispatcher. Views share their base's storage and count once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without a storage of their own
            return
        if storage in self._seen:
            return
        size, device = storage.nbytes(), tensor.device.type
        self._seen[storage] = size
        self.current[device] = self.current.get(device, 0) + size
        self.peak[device] = max(self.peak.get(device, 0), self.current[device])
        weakref.finalize(storage, self._free, device, size)

    def _free(self, device: str, size: int) -> None:
        self.current[device] -= size

    def __enter__(self):
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on deprecated module objects warns
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor):
                    self._add(obj)
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out


@dataclass
class Peak:
    """What `track_peak` measured: bytes (None when not measured) and how."""

    bytes: int | None = None
    weights_bytes: int | None = None  # live when tracking started: weights, quantization states, LoRA
    measure: str = "not measured (on the CPU: python -m training train --measure-memory)"


@contextlib.contextmanager
def track_peak(device_type: str, *, enabled: bool = True) -> Iterator[Peak]:
    """Peak tensor memory of the block on this process's device.

    CUDA: the allocator's own counter, reset on entry. CPU: LiveTensorMemory, which costs a
    Python call per operator (a few percent on real shapes, more than half of a tiny model's
    step); `enabled=False` skips it: runs count only when asked (train --measure-memory), and
    never under torch.compile (a dispatch mode gets in its way).
    """
    peak = Peak()
    if device_type == "cuda":
        torch.cuda.synchronize()
        peak.weights_bytes = int(torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        yield peak
        peak.bytes = int(torch.cuda.max_memory_allocated())
        peak.measure = "torch.cuda.max_memory_allocated"
        return
    if not enabled:
        yield peak
        return
    with LiveTensorMemory() as tracker:
        peak.weights_bytes = tracker.current.get("cpu", 0)
        yield peak
    peak.bytes = tracker.peak.get("cpu", 0)
    peak.measure = "peak bytes of live CPU tensors (training.train.memtrack.LiveTensorMemory)"
