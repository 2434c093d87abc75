"""python -m training: a mistyped argument or recipe value is answered before torch and its kin load."""

from __future__ import annotations

import json
import subprocess
import sys

# Each answered with status 2 and a message, as users type them.
MISTAKES = [
    ["train", "--profile", "0"],
    ["train", "--set", "lora.r=abc"],
    ["validate", "--set", "lora.r=abc"],
    ["estimate", "--set", "data.max_length=many"],
    ["merge", "--max-shard-size", "10XB"],
    ["merge", "--recipe", "recipes/nope.yaml"],
    ["eval", "--batch-size", "0"],
    ["push", "--set", "lora.r=abc"],
]
HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate")

# One process for all: the modules a verb imports stay imported for the next one.
PROBE = f"""
import contextlib, io, json, sys
from training.cli import main

answers = []
for argv in {MISTAKES!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    answers.append([status, err.getvalue()])
print(json.dumps({{"answers": answers, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_mistyped_arguments_and_recipe_values_are_answered_without_loading_torch():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    for argv, (status, stderr) in zip(MISTAKES, result["answers"], strict=True):
        assert status == 2, (argv, stderr)
        assert "error" in stderr, (argv, stderr)
    stderrs = [stderr for _, stderr in result["answers"]]
    assert "--profile: '0' is not a number of steps" in stderrs[0]
    assert "lora.r: Input should be a valid integer" in stderrs[1]
    assert "data.max_length" in stderrs[3]
    assert "--max-shard-size: '10XB'" in stderrs[4]
    assert "recipes/nope.yaml" in stderrs[5]
    assert "--batch-size '0'" in stderrs[6]
    # A second or more of imports on every mistake (measured 6-12 s on 2 cores) is what this spares.
    assert result["loaded"] == []
