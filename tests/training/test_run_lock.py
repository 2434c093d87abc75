"""train, merge and export of one run exclude each other (training.run_lock), each refused at once
by a real lock held by another process, before it writes anything."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import run_cli, train_in_process
from training.errors import RunInUse
from training.merge.coordinator import MergeSettings, merge_adapter
from training.run_dir import RunDir
from training.run_lock import one_command_at_a_time

HOLD = """
import sys
from training.run_dir import RunDir
from training.run_lock import one_command_at_a_time
from training.run_lock import one_command_at_a_time
with one_command_at_a_time(RunDir(sys.argv[1]), sys.argv[2], reads=[RunDir(p) for p in sys.argv[3:]]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextmanager
def held(run: Path, command: str, *, reading: Path | None = None) -> Iterator[subprocess.Popen]:
    """The run's lock, held by another process as `command` until the block ends (and the lock of the
    run it is `reading`, shared)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), command, *([str(reading)] if reading else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def contents(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_a_merge_of_a_run_being_trained_is_refused_and_writes_nothing(quickstart_run, tmp_path):
    run = tmp_path / "quickstart"
    shutil.copytree(quickstart_run / "adapter", run / "adapter")
    with held(run, "train") as trainer:
        before = contents(tmp_path)
        with pytest.raises(RunInUse, match=r"is being trained by another process") as caught:
            merge_adapter(run / "adapter", run / "merged", MergeSettings(verify="off"))
        assert contents(tmp_path) == before
    message = str(caught.value)
    assert (
        str(run) in message and f"pid {trainer.pid} on" in message and "Ctrl-C saves a checkpoint" in message
    )
    # Once the holder has ended, the same merge runs.
    merge_adapter(run / "adapter", run / "merged", MergeSettings(verify="off"))
    assert (run / "merged" / "merge.json").is_file()


def test_a_second_merge_into_the_same_folder_is_refused_and_leaves_the_first_ones_work(
    quickstart_run, tmp_path
):
    run = tmp_path / "quickstart"
    shutil.copytree(quickstart_run / "adapter", run / "adapter")
    unfinished = run / ".merged.partial-first"  # what the running merge is writing
    unfinished.mkdir()
    with held(run, "merge"), pytest.raises(RunInUse, match=r"is being merged by another process"):
        merge_adapter(run / "adapter", run / "merged", MergeSettings(verify="off"), force=True)
    assert unfinished.is_dir() and not (run / "merged").exists()


def test_a_train_of_a_run_being_merged_is_refused_and_writes_nothing(tiny_dir, tmp_path):
    run = tmp_path / "quickstart"
    refused = pytest.raises(RunInUse, match=r"is being merged by another process")
    with held(run, "merge") as merger, refused as caught:
        train_in_process("recipes/quickstart.yaml", tmp_path, force=True)
    assert f"pid {merger.pid} on" in str(caught.value)
    assert contents(tmp_path) == [Path(".quickstart.lock")]  # the holder's lock, nothing of the run
    assert RunDir(run).lock == tmp_path / ".quickstart.lock"


@pytest.mark.export
def test_an_export_of_a_run_being_merged_is_refused_and_leaves_its_work_folder(quickstart_gguf, tmp_path):
    from training.merge.export_gguf import ExportSettings, export_gguf

    source, _ = quickstart_gguf
    run = RunDir(tmp_path / "quickstart")
    shutil.copytree(source / "merged", run.merged)
    unfinished = run.path / ".gguf.partial-first"  # what a running export is writing
    unfinished.mkdir()
    with held(run.path, "merge") as merger, pytest.raises(RunInUse, match="is being merged") as caught:
        export_gguf(run.merged, run, ExportSettings(quants=("f32",), verify=False))
    assert f"pid {merger.pid} on" in str(caught.value)
    assert unfinished.is_dir() and not run.gguf_dir.exists()


def test_an_eval_of_a_run_being_trained_is_refused_and_a_train_of_one_being_evaluated_too(
    quickstart_run, tmp_path
):
    run = tmp_path / "quickstart"
    shutil.copytree(quickstart_run / "adapter", run / "adapter")
    with held(run, "train"):
        refused = run_cli("eval", "--set", f"output.dir={tmp_path}", "--model", "base", "--prompts", "1")
    assert refused.returncode == 2 and "is being trained by another process" in refused.stderr
    assert not (run / "eval.json").exists()
    with held(run, "eval"), pytest.raises(RunInUse, match=r"is being evaluated by another process"):
        train_in_process("recipes/quickstart.yaml", tmp_path, force=True)
    assert (run / "adapter").is_dir()  # --force deleted nothing under the evaluation


def test_a_push_of_a_run_being_trained_is_refused_before_it_builds_or_sends_anything(
    quickstart_run, tmp_path
):
    from training.release.hub import push

    run = tmp_path / "quickstart"
    shutil.copytree(quickstart_run / "adapter", run / "adapter")
    token = tmp_path / "token"
    token.write_text("hf_not_a_real_token\n")
    with held(run, "train"), pytest.raises(RunInUse, match=r"is being trained by another process"):
        push(run, "adapter", repo_id="someone/x", private=True, token_file=str(token))
    assert not (run / "upload").exists()


@pytest.mark.parametrize("adapter", ["adapter", "checkpoints/checkpoint-2"])
def test_a_merge_of_another_runs_adapter_is_refused_while_that_run_trains(quickstart_run, tmp_path, adapter):
    """merge --adapter of run A into a folder of run B: a train of A replaces A's adapter (--force
    deletes it, and training rotates its checkpoints away)."""
    trained = tmp_path / "a"
    shutil.copytree(quickstart_run / "adapter", trained / adapter)
    elsewhere = tmp_path / "b" / "merged"
    with held(trained, "train") as trainer, pytest.raises(RunInUse, match="is being trained") as caught:
        merge_adapter(trained / adapter, elsewhere, MergeSettings(verify="off"))
    assert f"{trained} is being trained by another process (pid {trainer.pid} on" in str(caught.value)
    assert not elsewhere.parent.exists()
    if adapter == "adapter":  # once the train has ended, the same merge runs
        merge_adapter(trained / adapter, elsewhere, MergeSettings(verify="off"))
        assert (elsewhere / "merge.json").is_file()


def test_a_train_force_of_a_run_whose_adapter_a_merge_reads_is_refused_and_deletes_nothing(
    quickstart_run, tmp_path
):
    """A real merge of run A's adapter into another folder, paused mid-merge: a train --force of A
    deleted the adapter it was reading."""
    run = tmp_path / "quickstart"
    shutil.copytree(quickstart_run / "adapter", run / "adapter")
    elsewhere = tmp_path / "elsewhere"
    merge = [
        "merge",
        "--adapter",
        str(run / "adapter"),
        "--out",
        str(elsewhere / "merged"),
        "--verify",
        "off",
    ]
    merger = subprocess.Popen([sys.executable, "-m", "training", *merge], stderr=subprocess.PIPE, text=True)
    try:
        pause_once_it_writes(merger, elsewhere, ".merged.partial-*")
        refused = pytest.raises(RunInUse, match=r"is being read by another process")
        with refused as caught:
            train_in_process("recipes/quickstart.yaml", tmp_path, "training.max_steps=1", force=True)
    finally:
        merger.send_signal(signal.SIGCONT)
        _, err = merger.communicate(timeout=120)
    assert f"{run} is being read by another process (by merge, pid {merger.pid} on" in str(caught.value)
    assert merger.returncode == 0, err[-2000:]
    assert (elsewhere / "merged" / "merge.json").is_file() and (run / "adapter" / "run.json").is_file()


def pause_once_it_writes(proc: subprocess.Popen, folder: Path, pattern: str) -> None:
    """Stop `proc` (SIGSTOP) as soon as a file matching `pattern` appears in `folder`."""
    deadline = time.time() + 120
    while not any(folder.glob(pattern)):
        assert proc.poll() is None and time.time() < deadline, "it ended before writing"
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)


def test_two_merges_of_one_adapter_into_different_folders_run_at_once(quickstart_run, tmp_path):
    run = tmp_path / "quickstart"
    shutil.copytree(quickstart_run / "adapter", run / "adapter")
    with held(tmp_path / "first", "merge", reading=run):
        merge_adapter(run / "adapter", tmp_path / "second" / "merged", MergeSettings(verify="off"))
    assert (tmp_path / "second" / "merged" / "merge.json").is_file()


def test_an_eval_of_another_runs_merged_model_is_refused_while_that_run_is_merged(tmp_path):
    other = tmp_path / "other"
    (other / "merged").mkdir(parents=True)  # the merged model a merge --force is replacing
    with held(other, "merge") as merger:
        refused = run_cli(
            "eval",
            "--set",
            f"output.dir={tmp_path / 'runs'}",
            "--model",
            str(other / "merged"),
            "--prompts",
            "1",
        )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"error: {other} is being merged by another process (pid {merger.pid} on" in refused.stderr
    assert not (tmp_path / "runs" / "quickstart" / "eval.json").exists()


def merged_base(tiny_dir: Path, tmp_path: Path) -> Path:
    """Run `other`'s merged model, as a base to fine-tune further: the tiny Llama the quickstart
    trains on, copied (not merged again) to other/merged."""
    merged = tmp_path / "other" / "merged"
    shutil.copytree(tiny_dir / "llama", merged)
    return merged


def test_the_run_of_a_base_model_is_the_run_whose_merged_model_it_is(tiny_dir, tmp_path):
    base = merged_base(tiny_dir, tmp_path)
    assert RunDir.of_base_model(str(base)) == RunDir(base.parent)
    elsewhere = tmp_path / "models" / "mine"  # merge --out models/mine: a merge.json names it a merge's
    shutil.copytree(base, elsewhere)
    (elsewhere / "merge.json").write_text("{}")
    assert RunDir.of_base_model(str(elsewhere)) == RunDir(elsewhere.parent, "mine")
    # Nothing of this stack replaces these: no lock is taken, and none is left beside them.
    assert RunDir.of_base_model("tiny://llama") is None
    assert RunDir.of_base_model(str(tiny_dir / "llama")) is None
    assert RunDir.of_base_model("someone/some-model") is None


def test_a_train_or_an_eval_on_another_runs_merged_model_is_refused_while_that_run_is_merged(
    tiny_dir, tmp_path
):
    """Continued fine-tuning of run `other`'s merge: a merge --force of `other` (or its train --force)
    would replace the base model while it loads."""
    base = merged_base(tiny_dir, tmp_path)
    runs = tmp_path / "runs"
    with held(base.parent, "merge") as merger:
        with pytest.raises(RunInUse, match="is being merged by another process") as caught:
            train_in_process("recipes/quickstart.yaml", runs, f"model.name={base}", force=True)
        refused = run_cli(
            "eval", "--set", f"output.dir={runs}", "--set", f"model.name={base}", "--model", "base"
        )
    refusal = f"{base.parent} is being merged by another process (pid {merger.pid} on"
    assert refusal in str(caught.value)
    assert str(caught.value).endswith("run this command again.")  # renaming this run would not help
    assert not (runs / "quickstart").exists()
    assert refused.returncode == 2 and f"error: {refusal}" in refused.stderr, refused.stderr[-2000:]


def test_a_merge_onto_another_runs_merged_model_is_refused_while_that_run_is_merged_not_while_read(
    quickstart_run, tiny_dir, tmp_path
):
    base = merged_base(tiny_dir, tmp_path)
    run = tmp_path / "quickstart"
    shutil.copytree(quickstart_run / "adapter", run / "adapter")
    record = json.loads((run / "adapter" / "run.json").read_text(encoding="utf-8"))
    record["recipe"]["model"]["name"] = str(base)  # as a run trained on other/merged records it
    (run / "adapter" / "run.json").write_text(json.dumps(record), encoding="utf-8")
    with held(base.parent, "merge") as merger, pytest.raises(RunInUse, match="is being merged") as caught:
        merge_adapter(run / "adapter", run / "merged", MergeSettings(verify="off"))
    assert f"{base.parent} is being merged by another process (pid {merger.pid} on" in str(caught.value)
    assert not (run / "merged").exists()
    # Another command that only reads other/merged (an eval of it) does not stop the merge.
    with held(tmp_path / "evaluating", "eval", reading=base.parent):
        merge_adapter(run / "adapter", run / "merged", MergeSettings(verify="off"))
    assert (run / "merged" / "merge.json").is_file()


def test_an_adapter_on_a_read_only_mount_is_merged_all_the_same(quickstart_run, tmp_path):
    """Its run's lock cannot be made there (another machine's outputs/, mounted read-only), and no
    train can replace the adapter there either."""
    shared = tmp_path / "shared"
    shutil.copytree(quickstart_run / "adapter", shared / "quickstart" / "adapter")
    merged = tmp_path / "mine" / "merged"
    merge = [
        "merge",
        "--adapter",
        str(shared / "quickstart" / "adapter"),
        "--out",
        str(merged),
        "--verify",
        "off",
    ]
    result = subprocess.run(
        read_only_mount(shared, [sys.executable, "-m", "training", *merge]), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (merged / "merge.json").is_file() and not (shared / ".quickstart.lock").exists()


def read_only_mount(folder: Path, command: list[str]) -> list[str]:
    """`command`, run where `folder` is a read-only mount: a bind mount in a user and mount namespace
    of its own (no root needed; root itself writes through permission bits)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user and mount namespaces here (unshare -rm) for a read-only mount")
    return ["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder), *command]


# What train of the versions before the shared lock did (commit 547a4aa): its own lock, beside the run.
EARLIER_TRAIN = """
import fcntl, os, socket, sys
with open(sys.argv[1], "a+", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\\n")
    lock.flush()
    print("held", flush=True)
    sys.stdin.read()
"""


def test_the_lock_of_an_earlier_version_is_removed_when_the_run_is_next_locked(tmp_path):
    run = RunDir(tmp_path / "quickstart")
    run.legacy_lock.write_text("pid 4242 on elsewhere\n")  # left by an earlier version's train, ended
    with one_command_at_a_time(run, "eval"):
        assert not run.legacy_lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".quickstart.lock"]


def test_a_run_an_earlier_version_trains_is_refused_and_its_lock_stays(quickstart_run, tmp_path):
    run = RunDir(tmp_path / "quickstart")
    shutil.copytree(quickstart_run / "adapter", run.adapter)
    earlier = subprocess.Popen(
        [sys.executable, "-c", EARLIER_TRAIN, str(run.legacy_lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert earlier.stdout.readline() == "held\n"
        with pytest.raises(RunInUse, match="is being trained by another process") as caught:
            train_in_process("recipes/quickstart.yaml", tmp_path, "training.max_steps=1", force=True)
        with pytest.raises(RunInUse, match="is being trained by another process"):
            merge_adapter(quickstart_run / "adapter", run.merged, MergeSettings(verify="off"))
    finally:
        earlier.stdin.close()
        earlier.wait(timeout=30)
    assert (
        f"(pid {earlier.pid} on {socket.gethostname()}, an earlier version of this stack; lock {run.legacy_lock})"
        in str(caught.value)
    )
    assert run.legacy_lock.is_file() and (run.adapter / "run.json").is_file()  # --force deleted nothing
    assert not run.merged.exists()
