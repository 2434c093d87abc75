"""python -m training eval: perplexity and greedy answers of the model variants."""

from __future__ import annotations

import errno
import json
import math
import resource
import subprocess
import sys

import pytest
import torch

from tests.training.conftest import quickstart_recipe
from training.errors import UserError
from training.model.loading import Device, load_model
from training.recipe import load_recipe
from training.release.evaluate import eval_data, evaluate

CPU = Device("cpu", "cpu", 1, False)


def test_eval_perplexity_matches_a_direct_computation(quickstart_run):
    from peft import PeftModel
    from transformers import AutoTokenizer

    recipe = quickstart_recipe(quickstart_run)
    report = evaluate(recipe, ["adapter"], prompts=0)
    model, _ = load_model(recipe.model, recipe.quantization, CPU, torch.float32)
    model = PeftModel.from_pretrained(model, quickstart_run / "adapter").eval()
    data = eval_data(recipe.data, AutoTokenizer.from_pretrained(quickstart_run / "adapter"))
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in data.dataset:
            ids = torch.tensor([row["input_ids"]])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            counted = torch.tensor(row["assistant_masks"][1:]).bool()
            nll -= logprobs[torch.arange(len(targets)), targets][counted].sum().item()
            count += int(counted.sum())
    ours = report["models"]["adapter (nf4)"]
    assert ours["tokens"] == count
    assert ours["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_eval_command_writes_table_json_and_chart(quickstart_run):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "eval",
            "--set",
            f"output.dir={quickstart_run.parent}",
            "--model",
            "base",
            "--model",
            "adapter",
            "--prompts",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "perplexity" in result.stdout and "adapter (nf4)" in result.stdout
    # peft 0.21.2 reads a property transformers 5.23 deprecated; the user is not told about it.
    assert "is_gradient_checkpointing" not in result.stderr
    report = json.loads((quickstart_run / "eval.json").read_text())
    assert report["prompts"] == 2 and len(report["models"]["base"]["answers"]) == 2
    assert (quickstart_run / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_without_validation_split_says_how_to_fix(quickstart_run):
    recipe = load_recipe(
        "recipes/quickstart.yaml", [f"output.dir={quickstart_run.parent}", "data.validation=null"]
    )
    with pytest.raises(UserError, match="no validation split"):
        evaluate(recipe, ["base"])


WRITE_REPORT = """
import json, sys
from pathlib import Path
from training.release.evaluate import write_report
folder = Path(sys.argv[1])
write_report(json.loads(sys.argv[2]), folder / "eval.json", folder / "eval.png")
"""


def test_a_chart_that_cannot_be_written_leaves_no_record_and_no_temporary_file(tmp_path):
    """A full disk, as a file size limit (no root needed) between the record's size and the chart's:
    the record is written after the chart, and the earlier evaluation's record is gone (its chart
    stays); nothing half-written is left."""
    report = {
        "source": "data/dolly-ja-sample.jsonl",
        "rows": 8,
        "prompts": 0,
        "models": {
            "base": {"perplexity": 31.4, "tokens": 90},
            "adapter (nf4)": {"perplexity": 12.5, "tokens": 90},
        },
    }
    (tmp_path / "eval.json").write_text('{"earlier": true}')
    (tmp_path / "eval.png").write_bytes(b"earlier chart")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the record fits, the chart does not

    proc = subprocess.run(
        [sys.executable, "-c", WRITE_REPORT, str(tmp_path), json.dumps(report)],
        preexec_fn=small_files,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert f"[Errno {errno.EFBIG}] File too large: '{tmp_path / 'eval.png'}'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.png"]
    assert (tmp_path / "eval.png").read_bytes() == b"earlier chart"
