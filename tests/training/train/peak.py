"""Peak memory of a few real training steps, measured as a run measures it: what the estimator is checked against."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from training.model.loading import compute_dtype, detect_device
from training.recipe import recipe_from_dict
from training.train.builder import build_trainer
from training.train.memtrack import LiveTensorMemory, track_peak
from training.train.sft_config import build_sft_config
from training.train.throughput import Throughput


@dataclass(frozen=True)
class Measured:
    peak_bytes: int
    weights_bytes: int  # live before the first step: weights, quantization states, LoRA
    device: str
    measure: str
    steps: int
    tokens_per_step: float

    def as_dict(self) -> dict:
        return dict(vars(self))


def measure_training_peak(recipe, source: str = "<recipe>", steps: int = 3) -> Measured:
    """Run `steps` optimizer steps of the recipe as a run trains it (no evaluation, no checkpoint)."""
    raw = recipe.to_dict()
    raw["data"]["validation"] = None
    with tempfile.TemporaryDirectory(prefix="qlora-measure-") as out:
        raw["output"]["dir"] = out
        raw["training"].update(
            max_steps=steps,
            save_strategy="no",
            eval_strategy="no",
            logging_steps=10**6,
            report_to="none",
            disable_tqdm=True,
        )
        measured = recipe_from_dict(raw, source)
        device = detect_device()
        dtype = compute_dtype(measured.model.dtype, device)
        args = build_sft_config(measured, device, str(dtype).removeprefix("torch."), source)
        throughput = Throughput()
        # A run trains in a process of its own; here earlier tests' fixtures may still hold tensors
        # (models, references), which track_peak counts too: they are not the run's, so they are left out.
        others = _live_bytes(device.type)
        trainer = build_trainer(measured, args, device, dtype, callbacks=[throughput]).trainer
        with track_peak(device.type) as peak:
            trainer.train()
    tokens = throughput.as_dict()["tokens_trained"] / steps
    return Measured(
        int(peak.bytes) - others, int(peak.weights_bytes) - others, device.type, peak.measure, steps, tokens
    )


def _live_bytes(device_type: str) -> int:
    if device_type == "cuda":
        return int(torch.cuda.memory_allocated())
    with LiveTensorMemory() as tracker:
        return tracker.current.get("cpu", 0)
