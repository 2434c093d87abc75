"""python -m training: a mistyped argument or recipe value, and --help, are answered before torch and its kin load."""

from __future__ import annotations

import json
import subprocess
import sys

from training.cli import VERBS
from training.model.tiny_names import ARCHITECTURES

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
    ["export", "--quant", "q9_z"],
    ["export", "--format", "onnx"],
    ["tiny-model", "--arch", "nope"],
]
# Every verb's help, answered with status 0, as fast as its mistakes.
HELP = [[verb, "--help"] for verb in VERBS]
HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate")

# One process for all: the modules a verb imports stay imported for the next one.
PROBE = f"""
import contextlib, io, json, sys
from training.cli import main

answers = []
for argv in {MISTAKES + HELP!r}:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    answers.append([status, out.getvalue(), err.getvalue()])
print(json.dumps({{"answers": answers, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_mistyped_arguments_recipe_values_and_help_are_answered_without_loading_torch():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    mistakes, helps = result["answers"][: len(MISTAKES)], result["answers"][len(MISTAKES) :]
    for argv, (status, _, stderr) in zip(MISTAKES, mistakes, strict=True):
        assert status == 2, (argv, stderr)
        assert "error" in stderr, (argv, stderr)
    for argv, (status, stdout, stderr) in zip(HELP, helps, strict=True):
        assert status == 0, (argv, stderr)
        assert f"usage: python -m training {argv[0]}" in stdout, (argv, stdout)
    stderrs = [stderr for _, _, stderr in mistakes]
    assert "--profile: '0' is not a number of steps" in stderrs[0]
    assert "lora.r: Input should be a valid integer" in stderrs[1]
    assert "data.max_length" in stderrs[3]
    assert "--max-shard-size: '10XB'" in stderrs[4]
    assert "recipes/nope.yaml" in stderrs[5]
    assert "--batch-size '0'" in stderrs[6]
    assert "--quant q9_z: choose from f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m" in stderrs[8]
    assert "--format onnx" in stderrs[9]
    assert "argument --arch: invalid choice: 'nope'" in stderrs[10]
    # The names the parsers offer come from the light modules (argparse wraps the lines).
    export_help, tiny_help = (
        " ".join(helps[HELP.index([v, "--help"])][1].split()) for v in ("export", "tiny-model")
    )
    assert "f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m (default q4_k_m)" in export_help
    assert "{" + ",".join(("all", *ARCHITECTURES)) + "}" in tiny_help
    # A second or more of imports on every mistake (measured 6-12 s on 2 cores) is what this spares.
    assert result["loaded"] == []
