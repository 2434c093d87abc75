"""bench/padding.py: padded positions counted as TRL's collator pads, on the stack's own rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is scripts, not a package: as the script itself sees it

from padding import padded_positions  # noqa: E402


def test_each_batch_pads_to_its_longest_row_and_the_last_batch_is_partial():
    lengths = [5, 1, 3, 2, 4]
    assert padded_positions(lengths, [0, 1, 2, 3, 4], 2) == 2 * 5 + 2 * 3 + 1 * 4
    assert padded_positions(lengths, [1, 3, 2, 4, 0], 2) == 2 * 2 + 2 * 4 + 1 * 5
    assert padded_positions(lengths, [0, 1, 2, 3, 4], 1) == sum(lengths)  # no padding


def test_length_grouped_batches_pad_less_than_random_ones_on_the_quickstart(tiny_dir):
    out = subprocess.run(
        [sys.executable, "bench/padding.py", "--seeds", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares = {
        line.split()[0]: float(line.split("are")[1].split("%")[0])
        for line in out.splitlines()
        if "of the padded positions" in line
    }
    assert 0 < shares["random"] < shares["group_by_length"] <= 100, out
