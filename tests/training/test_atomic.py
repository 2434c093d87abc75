"""Replacing a finished directory: atomic where the filesystem can exchange, recoverable where not."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from training import atomic
from training.atomic import exchange, move_into_place, remove_stale_partials, temp_dir_beside


def build(target: Path, content: str) -> Path:
    tmp = temp_dir_beside(target)
    (tmp / "weights").write_text(content)
    return tmp


def crash_on_second_rename(monkeypatch) -> None:
    """The process dies (SIGKILL has no handler to run) after the first rename of a replacement."""
    calls = []

    def dying(real):
        def rename(src, dst):
            calls.append((src, dst))
            if len(calls) == 2:
                raise SystemExit("killed")
            real(src, dst)

        return rename

    monkeypatch.setattr(atomic.os, "rename", dying(os.rename))
    monkeypatch.setattr(atomic.os, "replace", dying(os.replace))


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "name").write_text("a")
    (b / "name").write_text("b")
    if not exchange(a, b):
        pytest.skip("this filesystem cannot exchange (renameat2 RENAME_EXCHANGE)")
    assert (a / "name").read_text() == "b" and (b / "name").read_text() == "a"


def test_a_replacement_killed_midway_leaves_the_old_or_the_new_directory(tmp_path, monkeypatch):
    target = tmp_path / "merged"
    move_into_place(build(target, "old"), target)
    new = build(target, "new")
    crash_on_second_rename(monkeypatch)  # two renames: the old code dies between them
    with contextlib.suppress(SystemExit):
        move_into_place(new, target, replace=True)
    assert (target / "weights").read_text() in ("old", "new")


def test_without_exchange_a_killed_replacement_is_undone_by_the_next_run(tmp_path, monkeypatch):
    target = tmp_path / "merged"
    move_into_place(build(target, "old"), target)
    new = build(target, "new")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # e.g. NFS: no RENAME_EXCHANGE
    crash_on_second_rename(monkeypatch)
    with pytest.raises(SystemExit):
        move_into_place(new, target, replace=True)
    monkeypatch.undo()
    assert not target.exists()  # killed between the renames: only the copy aside is complete
    remove_stale_partials(tmp_path, "merged")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the unfinished new one is gone


def test_replacing_keeps_no_old_copy_and_refuses_without_replace(tmp_path):
    target = tmp_path / "adapter"
    move_into_place(build(target, "1"), target)
    move_into_place(build(target, "2"), target, replace=True)
    assert (target / "weights").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with pytest.raises(FileExistsError):
        move_into_place(build(target, "3"), target)


def test_stale_old_copies_are_deleted_when_the_target_is_in_place(tmp_path):
    target = tmp_path / "merged"
    move_into_place(build(target, "current"), target)
    (tmp_path / ".merged.old-123").mkdir()
    (tmp_path / ".merged.partial-x").mkdir()
    removed = remove_stale_partials(tmp_path, "merged")
    assert sorted(p.name for p in removed) == [".merged.old-123", ".merged.partial-x"]
    assert (target / "weights").read_text() == "current"
