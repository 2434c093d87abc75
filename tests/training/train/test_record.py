"""The summary a run prints at the end: losses rounded, one figure when only one loss was logged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from training.run_dir import RunDir
from training.train.record import log_summary


def summary(caplog, train: tuple, evaluation: tuple) -> str:
    metrics = {
        "global_step": 36,
        "train_loss_first": train[0],
        "train_loss_last": train[1],
        "eval_loss_start": evaluation[0],
        "eval_loss": evaluation[1],
        "tokens_per_second": 1234.5,
        "peak_memory_bytes": 2**20,
        "peak_memory_measure": "live CPU tensors",
    }
    record = {"run_name": "quickstart", "duration_s": 9.4, "metrics": metrics}
    with caplog.at_level(logging.INFO):
        log_summary(record, RunDir(Path("outputs/quickstart")))
    return caplog.text


@pytest.mark.parametrize(
    ("train", "evaluation", "train_line", "eval_line"),
    [
        ((7.866808319091797, 7.168729400634765), (7.94, 7.531), "7.8668 -> 7.1687", "7.9400 -> 7.5310"),
        ((7.866808319091797, 7.866808319091797), (7.94, 7.94), "7.8668\n", "7.9400\n"),  # one loss logged
    ],
)
def test_losses_are_rounded_and_a_single_loss_is_one_figure(caplog, train, evaluation, train_line, eval_line):
    text = summary(caplog, train, evaluation)
    assert f"train loss      {train_line}" in text and f"eval loss       {eval_line}" in text
    assert "Run 'quickstart' complete in 9 s: 36 steps" in text
