"""What a run records about itself (package versions, peak memory, time) and how sizes are shown."""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import sys
import time

import torch

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
    "qlora-stack",
)


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def peak_memory_bytes() -> dict[str, int]:
    """Peak resident memory of this process, and peak CUDA memory where a GPU is used."""
    peak = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_allocated"] = int(torch.cuda.max_memory_allocated())
        peak["cuda_reserved"] = int(torch.cuda.max_memory_reserved())
    return peak


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def human_size(n: float) -> str:
    """Bytes as people read them: 656.6 KB, 1.0 MB, 13.5 GB (units of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GB"
