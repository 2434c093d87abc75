"""bench/train_throughput.py keeps what it measured when it is stopped part way (a lent GPU's time limit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_bench_killed_after_its_first_run_leaves_that_run_in_its_report(tiny_dir, tmp_path):
    report = tmp_path / "train.json"
    cmd = [
        sys.executable, "bench/train_throughput.py", "--recipe", "recipes/quickstart.yaml", "--steps", "2",
        "--repeats", "1", "--variants", "tutorial,recipe", "--json", str(report),
    ]  # fmt: skip
    bench = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    output = []
    try:
        for line in bench.stdout:
            output.append(line)
            if line.startswith("[1/1] tutorial"):
                break
    finally:
        os.killpg(bench.pid, signal.SIGKILL)  # the bench and its variant's process, as `timeout -s KILL`
        bench.wait()
    assert report.is_file(), "".join(output[-30:])
    saved = json.loads(report.read_text())
    assert saved["complete"] is False and list(saved["results"]) == ["tutorial"]
    assert saved["results"]["tutorial"]["tokens_per_second"] > 0 and len(saved["runs"]["tutorial"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["train.json"]  # no temporary file left beside it
