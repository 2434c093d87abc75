"""Fixtures shared by the training tests: runs merged onto both bases."""

from __future__ import annotations

import pytest

from training.merge.coordinator import MergeSettings, merge_adapter
from training.recipe import load_recipe


@pytest.fixture(scope="session")
def both_bases(quickstart_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bases")
    records = {
        base: merge_adapter(quickstart_run / "adapter", out / base, MergeSettings(base=base))
        for base in ("original", "nf4-roundtrip")
    }
    return out, records


def quickstart_recipe(run_dir):
    return load_recipe("recipes/quickstart.yaml", [f"output.dir={run_dir.parent}"])
