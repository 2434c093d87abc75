"""train --profile: torch.profiler over real training steps, written where the run lives."""

from __future__ import annotations

import gzip
import json
import logging

import torch
from transformers import TrainerState, TrainingArguments
from transformers.trainer_callback import TrainerControl

from tests.conftest import read_run, run_cli, train_in_process
from training.train.step_profile import OPS, TRACE, StepProfiler

QUICK = "recipes/quickstart.yaml"


def test_a_profiled_run_records_its_second_and_third_steps_per_operator(tiny_dir, tmp_path):
    assert (
        train_in_process(QUICK, tmp_path, "training.max_steps=3", "data.validation=null", profile_steps=2)
        == 0
    )
    run = tmp_path / "quickstart"
    assert sorted(p.name for p in (run / "profile").iterdir()) == [OPS, TRACE]  # nothing half-written beside
    ops = (run / "profile" / OPS).read_text()
    header = ops.splitlines()[0]
    assert header.startswith("2 training step(s), steps 2-3: ") and "s a step" in header
    # The real 4-bit layers and the matmuls under them, each counted over the two steps.
    assert "MatMul4Bit" in ops and "aten::mm" in ops
    trace = json.loads(gzip.decompress((run / "profile" / TRACE).read_bytes()))
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert read_run(run)["metrics"]["profiled_steps"] == [2, 3]


def test_a_resumed_session_is_profiled_from_its_own_second_step(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(global_step=10), TrainerControl()
    profiler = StepProfiler(2, tmp_path / "profile", cuda=False)
    profiler.on_train_begin(args, state, control)
    for _ in range(5):  # steps 11-15: the profiler records 12 and 13
        profiler.on_step_begin(args, state, control)
        torch.ones(64, 64) @ torch.ones(64, 64)
        state.global_step += 1
        profiler.on_step_end(args, state, control)
    profiler.on_train_end(args, state, control)
    assert profiler.profiled_steps == [12, 13]
    assert (tmp_path / "profile" / OPS).read_text().startswith("2 training step(s), steps 12-13: ")


def test_a_run_stopped_before_its_profile_is_complete_writes_what_it_recorded(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(global_step=0), TrainerControl()
    profiler = StepProfiler(5, tmp_path / "profile", cuda=False)
    profiler.on_train_begin(args, state, control)
    for _ in range(3):  # a stop (or max_steps) after step 3: steps 2 and 3 recorded
        profiler.on_step_begin(args, state, control)
        state.global_step += 1
        profiler.on_step_end(args, state, control)
    profiler.on_train_end(args, state, control)
    assert profiler.profiled_steps == [2, 3]
    assert (tmp_path / "profile" / OPS).read_text().startswith("2 training step(s), steps 2-3: ")


def test_a_run_of_one_step_says_nothing_was_profiled(tmp_path, caplog):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(global_step=0), TrainerControl()
    profiler = StepProfiler(2, tmp_path / "profile", cuda=False)
    profiler.on_train_begin(args, state, control)
    profiler.on_step_begin(args, state, control)
    state.global_step += 1
    profiler.on_step_end(args, state, control)
    with caplog.at_level(logging.WARNING):
        profiler.on_train_end(args, state, control)
    assert "nothing profiled; this session trained 1 step(s)" in caplog.text
    assert not (tmp_path / "profile").exists() and profiler.profiled_steps == []


def test_profile_steps_must_be_a_positive_number():
    for bad in ("0", "-1", "three"):
        result = run_cli("train", "--recipe", QUICK, "--profile", bad)
        assert result.returncode == 2
        assert f"--profile: {bad!r} is not a number of steps: give a whole number, 1 or more" in result.stderr
