"""Real 4-bit QLoRA training of the tiny models: it learns, it records, it resumes, it stops cleanly."""

from __future__ import annotations

import json
import logging
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import read_run, train_command, train_in_process
from training.errors import CheckpointError, DataError, OutOfMemory, RunInUse
from training.train import run as run_module
from training.train.checkpoints import MARKER, checkpoints
from training.train.throughput import Throughput

QUICK = "recipes/quickstart.yaml"


def test_quickstart_qlora_lowers_eval_loss_and_records_the_run(quickstart_run):
    run = read_run(quickstart_run)
    metrics = run["metrics"]
    assert run["status"] == "complete"
    assert metrics["eval_loss"] < metrics["eval_loss_start"] - 0.1
    assert (
        run["model"]["description"] == "4-bit NF4 + double quant" and run["model"]["quantized_layers"] == 14
    )
    assert run["model"]["trainable_parameters"] > 0 and run["compute_dtype"] == "float32"
    data = run["data"]
    assert data["train"]["rows"] + data["eval"]["rows"] == 80 and data["train"]["rows_skipped_bad"] == 0
    assert data["max_length"] == 256 and data["completion_only_loss"] is True and data["packing"] is False
    assert data["train_sampling_strategy"] == "group_by_length"
    assert json.loads((quickstart_run / "data_order.json").read_text()) == {
        "train_sampling_strategy": "group_by_length"
    }
    assert data["train"]["loss_tokens"] < data["train"]["tokens"]  # prompts are masked out
    assert metrics["tokens_per_second"] > 0 and metrics["steady_tokens_per_second"] > 0
    assert metrics["peak_memory"]["process_rss"] > 0
    # Live tensor bytes at the peak (the quantity the memory estimator predicts; measured when asked,
    # as the fixture does): every layer's saved activations (no checkpointing on the CPU where memory
    # allows) and the loss head's log-softmax with its gradients, far more than the 1 MB of weights.
    assert 10 * 2**20 < metrics["peak_memory_bytes"] < metrics["peak_memory"]["process_rss"]
    assert metrics["peak_memory_measure"].startswith("peak bytes of live CPU tensors")
    # The estimator's prediction for this run as it ran, which assumes every row max_length tokens
    # long: above what these shorter rows used, and in the same range.
    assert (
        metrics["peak_memory_bytes"]
        < metrics["estimated_peak_memory_bytes"]
        < 3 * metrics["peak_memory_bytes"]
    )
    assert run["versions"]["bitsandbytes"] == "0.50.2" and len(data["fingerprint"]) == 16
    assert json.loads((quickstart_run / "adapter" / "run.json").read_text()) == run
    # The loss curve of the run, for notebooks and plots: train losses at every logging step.
    history = run["history"]
    train_steps = [h["step"] for h in history if "loss" in h]
    assert train_steps == sorted(train_steps) and len(train_steps) >= metrics["global_step"] // 5
    assert [h["loss"] for h in history if "loss" in h][-1] == metrics["train_loss_last"]
    assert any("eval_loss" in h for h in history)


def test_gpt_neox_qlora_lowers_eval_loss(neox_run):
    run = read_run(neox_run)
    assert run["metrics"]["eval_loss"] < run["metrics"]["eval_loss_start"] - 0.1
    assert run["model"]["lora_target_modules"] == [
        "dense",
        "dense_4h_to_h",
        "dense_h_to_4h",
        "query_key_value",
    ]
    assert run["data"]["packing"] is True and run["data"]["completion_only_loss"] is False


def test_adapter_is_plain_peft_with_the_training_chat_template(quickstart_run, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = quickstart_run / "adapter"
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "日本の首都は?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<s>ユーザー:日本の首都は?\nシステム:"

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "llama")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        tuned_logits = tuned(ids).logits
        generated = tuned.generate(ids, max_new_tokens=5, do_sample=False)
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)  # the adapter changes the model
    assert generated.shape[1] > ids.shape[1]


def test_rerunning_a_complete_run_changes_nothing(quickstart_run, caplog):
    caplog.set_level(logging.INFO, logger="training")
    before = (quickstart_run / "run.json").read_text()
    assert train_in_process(QUICK, quickstart_run.parent) == 0
    assert (quickstart_run / "run.json").read_text() == before
    assert "already complete" in caplog.text


def test_rerunning_a_complete_run_with_another_recipe_is_refused(quickstart_run):
    before = (quickstart_run / "run.json").read_text()
    with pytest.raises(CheckpointError, match=r"finished run of a different recipe") as caught:
        train_in_process(QUICK, quickstart_run.parent, "lora.r=8", "training.logging_steps=3")
    assert "(changed: lora.r: 16 -> 8)" in str(caught.value)  # logging changes no adapter
    assert "--force" in str(caught.value) and (quickstart_run / "run.json").read_text() == before


def test_a_run_recorded_before_a_recipe_key_existed_is_still_complete(quickstart_run, tmp_path, caplog):
    """Upgrading the stack adds recipe keys at their defaults; that alone is no change of recipe."""
    caplog.set_level(logging.INFO, logger="training")
    run = shutil.copytree(quickstart_run, tmp_path / quickstart_run.name)
    record = run / "adapter" / "run.json"
    older = json.loads(record.read_text())
    del older["recipe"]["lora"]["use_rslora"]  # as if recorded before the key existed
    record.write_text(json.dumps(older))
    assert train_in_process(QUICK, tmp_path) == 0
    assert "already complete" in caplog.text
    # The same key set away from its default is a change, recorded or not.
    with pytest.raises(CheckpointError, match=r"\(changed: lora.use_rslora: False -> True\)"):
        train_in_process(QUICK, tmp_path, "lora.use_rslora=true")


@pytest.fixture(scope="module")
def interrupted_run(tiny_dir, tmp_path_factory) -> Path:
    """A run stopped by SIGTERM (as `docker compose stop` does) after a few steps."""
    out = tmp_path_factory.mktemp("sigterm")
    cmd = train_command(
        QUICK, out, "training.max_steps=400", "training.save_steps=1000", "training.eval_steps=1000"
    )
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    for line in proc.stderr:
        if "Trainable parameters" in line:
            break
    time.sleep(3)  # a few optimizer steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Run the same command again to resume" in err
    return out / "quickstart"


def test_sigterm_saves_a_complete_checkpoint_and_exits(interrupted_run):
    saved = checkpoints(interrupted_run / "checkpoints")
    assert len(saved) == 1
    step, path = saved[0]
    assert 0 < step < 400 and (path / MARKER).is_file() and (path / "optimizer.pt").is_file()
    run = read_run(interrupted_run)
    assert run["status"] == "interrupted" and run["global_step"] == step
    assert not (interrupted_run / "adapter").exists()


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


def test_resume_refuses_a_changed_recipe(interrupted_run, tmp_path):
    copy_run(interrupted_run, tmp_path)
    with pytest.raises(CheckpointError, match=r"changed: lora.r: 16 -> 8") as caught:
        train_in_process(QUICK, tmp_path, "lora.r=8", "eval.tasks=[kobest]", "training.max_steps=400")
    assert "eval" not in str(caught.value)  # how a run is judged does not change its checkpoints


def test_resume_keeps_the_data_order_defaults_the_run_started_with(interrupted_run, tmp_path, caplog):
    """A run started under another default (as GPU runs before length-grouped batches did) resumes
    with the batches it started with, so that the rest of its epoch is the same rows; a run from
    before the record resumes with today's default and says how to pin the old one."""
    caplog.set_level(logging.INFO, logger="training")
    run = copy_run(interrupted_run, tmp_path)
    step, _ = checkpoints(run / "checkpoints")[0]
    (run / "data_order.json").write_text('{"train_sampling_strategy": "random"}')
    assert train_in_process(QUICK, tmp_path, f"training.max_steps={step + 1}") == 0
    assert read_run(run)["data"]["train_sampling_strategy"] == "random"
    assert "Resuming with train_sampling_strategy=random, as this run started" in caplog.text
    assert json.loads((run / "data_order.json").read_text()) == {"train_sampling_strategy": "random"}

    caplog.clear()
    legacy = copy_run(interrupted_run, tmp_path / "legacy")
    (legacy / "data_order.json").unlink()
    assert train_in_process(QUICK, tmp_path / "legacy", f"training.max_steps={step + 1}") == 0
    assert read_run(legacy)["data"]["train_sampling_strategy"] == "group_by_length"
    assert "started before this stack recorded its data-order defaults" in caplog.text
    assert str(legacy / "data_order.json") in caplog.text


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("{random", "not valid JSON"),
        ('["random"]', "expected an object"),
        ('{"seed": 1}', "'seed' is not recorded there; allowed: train_sampling_strategy"),
        ('{"train_sampling_strategy": "randm"}', "'randm' is not one of random, sequential, group_by_length"),
    ],
)
def test_a_hand_written_data_order_that_is_wrong_is_refused_naming_the_file(
    interrupted_run, tmp_path, written, message
):
    run = copy_run(interrupted_run, tmp_path)
    (run / "data_order.json").write_text(written)
    with pytest.raises(CheckpointError, match=re.escape(message)) as caught:
        train_in_process(QUICK, tmp_path, "training.max_steps=400")
    assert str(run / "data_order.json") in str(caught.value)


def test_resume_refuses_a_checkpoint_without_optimizer_state(interrupted_run, tmp_path):
    run = copy_run(interrupted_run, tmp_path)
    _, checkpoint = checkpoints(run / "checkpoints")[0]
    (checkpoint / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"lacks optimizer.pt.*silently restart the optimizer"):
        train_in_process(QUICK, tmp_path, "training.max_steps=400")


def test_half_written_checkpoint_is_skipped_and_run_resumes(interrupted_run, tmp_path):
    run = copy_run(interrupted_run, tmp_path)
    step, _ = checkpoints(run / "checkpoints")[0]
    half = run / "checkpoints" / f"checkpoint-{step + 5}"  # what a kill during a save leaves behind
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"partial")
    assert train_in_process(QUICK, tmp_path, f"training.max_steps={step + 2}") == 0
    result = read_run(run)
    assert result["status"] == "complete" and result["metrics"]["global_step"] == step + 2
    assert result["resumed_from"].endswith(f"checkpoint-{step}")
    assert not half.exists()


def test_killed_run_resumes_and_finishes_like_a_straight_run(tiny_dir, tmp_path):
    settings = [
        "training.max_steps=12",
        "training.save_steps=4",
        "training.eval_steps=4",
        "training.logging_steps=1",
    ]
    straight = tmp_path / "straight"
    assert train_in_process(QUICK, straight, *settings) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(QUICK, killed, *settings), stderr=subprocess.DEVNULL)
    marker = killed / "quickstart" / "checkpoints" / "checkpoint-4" / MARKER
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert marker.exists()
    assert not (killed / "quickstart" / "adapter").exists()

    assert train_in_process(QUICK, killed, *settings) == 0
    a, b = read_run(straight / "quickstart"), read_run(killed / "quickstart")
    assert b["resumed_from"] is not None
    assert a["metrics"]["global_step"] == b["metrics"]["global_step"] == 12
    # Tolerance: a resumed run replays the same data order and RNG state; only float
    # summation order may differ, so losses agree to far better than 0.02.
    assert b["metrics"]["train_loss_last"] == pytest.approx(a["metrics"]["train_loss_last"], abs=0.02)
    assert b["metrics"]["eval_loss"] == pytest.approx(a["metrics"]["eval_loss"], abs=0.02)
    # The resumed run's history covers the steps trained before the kill too.
    assert [h["step"] for h in b["history"] if "loss" in h] == list(range(1, 13))
    assert last_learning_rate(straight) == pytest.approx(last_learning_rate(killed), rel=1e-9)


def last_learning_rate(out: Path) -> float:
    state = json.loads(
        (out / "quickstart" / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text()
    )
    return [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h][-1]


def test_sigkill_during_a_checkpoint_save_resumes_from_the_last_complete_one(tiny_dir, tmp_path):
    # A larger adapter makes each save take long enough to be caught in the middle.
    settings = ["training.max_steps=10", "training.save_steps=2", "training.eval_strategy=no", "lora.r=128"]
    caught = None
    for attempt in range(5):
        out = tmp_path / f"attempt-{attempt}"
        folder = out / "quickstart" / "checkpoints"
        proc = subprocess.Popen(train_command(QUICK, out, *settings), stderr=subprocess.DEVNULL)
        while proc.poll() is None and caught is None:
            caught = next(
                (p for step, p in checkpoints(folder) if step >= 4 and not (p / MARKER).exists()), None
            )
        proc.kill()
        proc.wait()
        if caught is not None and caught.exists() and not (caught / MARKER).exists():
            break
        caught = None
    assert caught is not None, "no save was caught half-written in 5 attempts"
    step = int(caught.name.split("-")[1])

    assert train_in_process(QUICK, out, *settings) == 0
    run = read_run(out / "quickstart")
    assert run["resumed_from"].endswith(f"checkpoint-{step - 2}")
    assert run["metrics"]["global_step"] == 10


def test_a_run_stopped_after_its_last_checkpoint_resumes_without_training_past_max_steps(tiny_dir, tmp_path):
    """Stopped during the final evaluation or while writing the adapter: the rerun writes the adapter
    of the last checkpoint. The Trainer trained one more step, past max_steps and its LR schedule."""
    from safetensors.torch import load_file

    settings = ["training.max_steps=3", "training.save_steps=1", "training.eval_strategy=no"]
    assert train_in_process(QUICK, tmp_path, *settings) == 0
    run = tmp_path / "quickstart"
    shutil.rmtree(run / "adapter")  # what a kill after checkpoint-3 leaves
    (run / "run.json").unlink()

    assert train_in_process(QUICK, tmp_path, *settings) == 0
    result = read_run(run)
    assert result["resumed_from"].endswith("checkpoint-3") and result["metrics"]["global_step"] == 3
    assert [step for step, _ in checkpoints(run / "checkpoints")] == [2, 3]
    last = load_file(run / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == last.keys() and all(torch.equal(adapter[k], last[k]) for k in last)


def test_a_second_train_of_a_running_run_is_refused_and_touches_nothing(tiny_dir, tmp_path):
    settings = ["training.max_steps=400", "training.save_steps=1000", "training.eval_strategy=no"]
    first = subprocess.Popen(train_command(QUICK, tmp_path, *settings), stderr=subprocess.PIPE, text=True)
    read_until(first, "Trainable parameters")
    run = tmp_path / "quickstart"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    try:
        with pytest.raises(RunInUse, match=r"is being trained by another process") as caught:
            train_in_process(QUICK, tmp_path, "training.max_steps=1", "training.eval_strategy=no", force=True)
    except BaseException:
        first.kill()
        raise
    assert str(run) in str(caught.value) and f"pid {first.pid} on" in str(caught.value)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # --force deleted nothing

    read_until(first, "1/400")  # training has begun: SIGTERM saves a checkpoint
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    [(step, _)] = checkpoints(run / "checkpoints")
    # Once the first has ended, the same command resumes it.
    assert train_in_process(QUICK, tmp_path, *settings[1:], f"training.max_steps={step + 1}") == 0
    assert read_run(run)["resumed_from"].endswith(f"checkpoint-{step}")


def test_a_write_that_fails_names_the_file_without_a_traceback(tiny_dir, tmp_path):
    """A full disk, as a file size limit (no root needed): the run stops with the file it could not
    write, and leaves neither a run folder nor a half-written file."""

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))  # recipe.json is larger

    proc = subprocess.run(
        train_command(QUICK, tmp_path), preexec_fn=small_files, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {tmp_path / 'quickstart' / 'recipe.json'}: File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "quickstart").exists()


def test_a_checkpoint_the_disk_cannot_hold_names_it_in_one_line_and_the_run_resumes_before_it(
    tiny_dir, tmp_path
):
    """A full disk during a checkpoint save, as a file size limit (no root needed) that the adapter
    (282 KB) fits and the optimizer state (581 KB, written by torch.save) does not: torch's zip
    writer said only "unexpected pos". The half-written checkpoint does not stay."""
    settings = ["training.save_steps=2", "training.eval_strategy=no"]
    assert train_in_process(QUICK, tmp_path, "training.max_steps=2", *settings) == 0
    run = tmp_path / "quickstart"
    shutil.rmtree(run / "adapter")  # what a kill after checkpoint-2 leaves
    (run / "run.json").unlink()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    proc = subprocess.run(
        train_command(QUICK, tmp_path, "training.max_steps=4", *settings),
        preexec_fn=small_files,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    failed = run / "checkpoints" / "checkpoint-4"
    assert f"error: {failed}: could not be written: no space left on the device" in proc.stderr
    assert "Free space there" in proc.stderr and "Traceback" not in proc.stderr
    assert [step for step, _ in checkpoints(run / "checkpoints")] == [2]
    assert train_in_process(QUICK, tmp_path, "training.max_steps=4", *settings) == 0
    assert read_run(run)["resumed_from"].endswith("checkpoint-2")


def test_a_final_save_the_disk_cannot_hold_names_the_adapter_in_one_line_and_the_rerun_only_saves(
    tiny_dir, tmp_path
):
    """A full disk once training has ended, as a file size limit (no root needed) that the adapter's
    weights (282 KB) exceed, in a run whose training is over: its last checkpoint holds its last step
    (a run killed while it wrote its adapter), so only the final save writes. safetensors' traceback
    ended it, and its half-written adapter stayed."""
    settings = ["training.max_steps=2", "training.save_steps=2", "training.eval_strategy=no"]
    assert train_in_process(QUICK, tmp_path, *settings) == 0
    run = tmp_path / "quickstart"
    shutil.rmtree(run / "adapter")  # what a kill while the adapter was written leaves
    (run / "run.json").unlink()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run(
        train_command(QUICK, tmp_path, *settings), preexec_fn=small_files, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {run / 'adapter'}: File too large. Free space there" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "data_order.json", "recipe.json"]
    assert [step for step, _ in checkpoints(run / "checkpoints")] == [2]
    assert train_in_process(QUICK, tmp_path, *settings) == 0
    finished = read_run(run)
    assert finished["resumed_from"].endswith("checkpoint-2") and finished["metrics"]["global_step"] == 2
    assert json.loads((run / "adapter" / "run.json").read_text()) == finished


def test_a_resumed_run_saves_at_the_intervals_of_the_recipe_it_resumes_with(tiny_dir, tmp_path, caplog):
    """The Trainer restored save_steps from the checkpoint and kept saving every 2 steps."""
    caplog.set_level(logging.INFO, logger="training")
    settings = ["training.eval_strategy=no", "training.save_total_limit=10"]
    assert train_in_process(QUICK, tmp_path, "training.max_steps=2", "training.save_steps=2", *settings) == 0
    run = tmp_path / "quickstart"
    shutil.rmtree(run / "adapter")  # what a kill after checkpoint-2 leaves
    (run / "run.json").unlink()
    assert train_in_process(QUICK, tmp_path, "training.max_steps=5", "training.save_steps=1", *settings) == 0
    assert [step for step, _ in checkpoints(run / "checkpoints")] == [2, 3, 4, 5]
    assert "Resumed with the recipe's intervals: save_steps 1 (was 2)" in caplog.text


def read_until(proc: subprocess.Popen, text: str) -> None:
    """Read stderr until `text` (progress bars end their lines with \r, not \n)."""
    seen = ""
    while text not in seen and proc.poll() is None:
        seen = seen[-200:] + proc.stderr.read(1)


def test_force_starts_over(interrupted_run, tmp_path):
    run = copy_run(interrupted_run, tmp_path)
    assert train_in_process(QUICK, tmp_path, "training.max_steps=3", force=True) == 0
    result = read_run(run)
    assert result["resumed_from"] is None and result["metrics"]["global_step"] == 3


@pytest.mark.parametrize(("limit", "kept"), [(2, [2, 3]), (-1, [1, 2, 3])])
def test_save_total_limit_keeps_the_newest_and_zero_or_less_keeps_all(tiny_dir, tmp_path, limit, kept):
    # As transformers' own rotation: 0 or less is no limit. A negative limit deleted each new checkpoint.
    settings = ["training.max_steps=3", "training.save_steps=1", "training.eval_strategy=no"]
    assert train_in_process(QUICK, tmp_path, *settings, f"training.save_total_limit={limit}") == 0
    assert [step for step, _ in checkpoints(tmp_path / "quickstart" / "checkpoints")] == kept


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("data.on_bad_row=error", "line 1: output: missing"),
        ("data.on_bad_row=skip", "0 validation rows"),  # every row skipped
    ],
)
def test_a_first_run_that_fails_on_its_data_leaves_no_run_folder(tiny_dir, tmp_path, setting, error):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "Q", "input": ""}\n' * 20, encoding="utf-8")
    out = tmp_path / "outputs"
    with pytest.raises(DataError, match=error):
        train_in_process(QUICK, out, f"data.source={rows}", setting)
    assert not (out / "quickstart").exists()  # no recipe.json or data_order.json of a run that never trained


def test_a_first_run_stopped_at_once_before_a_checkpoint_leaves_no_run_folder(tiny_dir, tmp_path):
    """Ctrl-C as training starts, and again if the first one was taken as "save, then stop":
    the run ends before any checkpoint is complete, with nothing to resume."""
    proc = subprocess.Popen(
        train_command(QUICK, tmp_path, "training.max_steps=400", "training.save_steps=1000"),
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    for line in proc.stderr:
        if "Trainable parameters" in line:
            break
    assert (tmp_path / "quickstart" / "recipe.json").is_file()  # the run had started
    proc.send_signal(signal.SIGINT)
    err = ""
    for line in proc.stderr:
        err += line
        if "SIGINT received" in line:  # sent together, two signals could arrive as one
            proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, err[-2000:]
    assert "No checkpoint was complete: removing what this run wrote" in err
    assert not (tmp_path / "quickstart").exists()  # no empty checkpoints/ either


def test_a_first_run_stopped_by_sigterm_while_loading_leaves_no_run_folder(tiny_dir, tmp_path):
    """docker stop while the data and the model load (minutes for a 7B model): before training
    began, SIGTERM killed the process on the spot and left recipe.json and data_order.json."""
    proc = subprocess.Popen(train_command(QUICK, tmp_path), stderr=subprocess.PIPE, text=True)
    read_until(proc, "Data train:")  # the data is being prepared; the model loads next
    assert (tmp_path / "quickstart" / "recipe.json").is_file()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received while not training: stopping" in err
    assert not (tmp_path / "quickstart").exists()


def test_a_resumed_run_that_fails_keeps_its_folder(tiny_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    shutil.copy("data/ja_dolly.jsonl", rows)
    settings = [f"data.source={rows}", "training.save_steps=1", "training.eval_strategy=no"]
    assert train_in_process(QUICK, tmp_path, "training.max_steps=1", *settings) == 0
    run = tmp_path / "quickstart"
    shutil.rmtree(run / "adapter")  # as if stopped after checkpoint-1: it resumes from there
    rows.write_text('{"instruction": "Q", "input": ""}\n', encoding="utf-8")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(DataError, match="output: missing"):
        train_in_process(QUICK, tmp_path, "training.max_steps=2", *settings)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert [step for step, _ in checkpoints(run / "checkpoints")] == [1]


class _RunsOutOfMemoryAtStep2(Throughput):
    # A GPU's allocator failing mid-step; the CPU's allocator raises a plain RuntimeError instead.
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().on_step_begin(args, state, control, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "advice"),
    [
        ((), "--set training.activation_checkpointing=true"),  # the default turned it off
        (("training.activation_checkpointing=false",), "Lower training.per_device_train_batch_size"),
    ],
)
def test_out_of_memory_names_the_setting_to_change(tiny_dir, tmp_path, monkeypatch, overrides, advice):
    monkeypatch.setattr(run_module, "Throughput", _RunsOutOfMemoryAtStep2)
    with pytest.raises(OutOfMemory) as raised:
        train_in_process(QUICK, tmp_path, "training.max_steps=4", *overrides)
    message = str(raised.value)
    assert (
        "out of memory while training, at step 2 (CUDA out of memory. Tried to allocate 2.00 GiB)" in message
    )
    assert advice in message
    assert ("checkpointing was off: this stack turns it off by default" in message) == (not overrides)
    assert not (tmp_path / "quickstart" / "adapter").exists()
