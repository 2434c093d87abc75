"""bench/train_throughput.py --profile: each variant's profile lands in the bench's results."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is scripts, not a package: as the script itself sees it

from train_throughput import Profile, run_recipe, run_tutorial  # noqa: E402

QUICK = "recipes/quickstart.yaml"


def test_the_recipe_and_the_tutorial_are_profiled_into_the_folder_given(tiny_dir, tmp_path):
    for name, run in (
        ("recipe", lambda p: run_recipe(QUICK, 2, str(tmp_path / "r"), "recipe", p)),
        ("tutorial", lambda p: run_tutorial(QUICK, 2, str(tmp_path / "t"), p)),
    ):
        folder = tmp_path / "profile" / name
        result = run(Profile(1, folder))
        assert result["tokens"] > 0
        assert sorted(p.name for p in folder.iterdir()) == ["ops.txt", "trace.json.gz"]
        assert (folder / "ops.txt").read_text().startswith("1 training step(s), step 2: ")
