"""train, merge and export of one run exclude each other (training.run_lock), each refused at once
by a real lock held by another process, before it writes anything."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import run_cli, train_in_process
from training.errors import RunInUse
from training.merge.coordinator import MergeSettings, merge_adapter
from training.run_dir import RunDir

HOLD = """
import sys
from training.run_dir import RunDir
from training.run_lock import one_command_at_a_time
with one_command_at_a_time(RunDir(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextmanager
def held(run: Path, command: str) -> Iterator[subprocess.Popen]:
    """The run's lock, held by another process as `command` until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), command],
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
