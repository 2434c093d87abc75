"""The peers' side of the training benchmark: same rows, same tokens, same settings (no peer is installed here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from training.data.prepare import prepare_data
from training.model.loading import load_tokenizer
from training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is scripts, not a package: as the script itself sees it

from peers import PEERS, axolotl_config, command, llamafactory_config  # noqa: E402


def test_rendered_rows_tokenize_to_the_stacks_ids_and_loss_masks_and_configs_carry_the_settings(
    tiny_dir, tmp_path
):
    out = tmp_path / "peer-data"
    cmd = [
        sys.executable,
        "bench/train_throughput.py",
        "--render-for-peers",
        "recipes/quickstart.yaml",
        "7",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    recipe = load_recipe("recipes/quickstart.yaml", ["data.validation=null"])
    tokenizer = load_tokenizer(recipe.model)
    prepared = prepare_data(recipe.data, tokenizer)
    rows = [json.loads(line) for line in (out / "rendered.jsonl").read_text(encoding="utf-8").splitlines()]
    segments = [
        json.loads(line) for line in (out / "segments.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(rows) == len(segments) == len(prepared.train) == 80
    for row, seg, ids, mask in zip(
        rows, segments, prepared.train["input_ids"], prepared.train["assistant_masks"], strict=True
    ):
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        assert prompt + response == ids and [0] * len(prompt) + [1] * len(response) == mask
        assert seg["segments"] == [
            {"label": False, "text": row["prompt"]},
            {"label": True, "text": row["response"]},
        ]

    settings = json.loads((out / "settings.json").read_text())
    assert settings["steps"] == 7 and settings["batch"] == 8 and settings["max_length"] == 256
    assert settings["activation_checkpointing"] is False  # as the recipe trains on this CPU
    lf = llamafactory_config(settings, out, tmp_path)
    ax = axolotl_config(settings, out, tmp_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lf["lora_target"].split(",") == ax["lora_target_modules"] == targets
    # Unsloth reads the same settings and rows through its runner's config.
    cmd, env = command(PEERS["unsloth"], tmp_path / "venv", settings, out, tmp_path)
    assert cmd[1].endswith("unsloth_train.py") and env["PYTHONPATH"].endswith("peers")
    passed = json.loads(Path(cmd[2]).read_text())
    assert passed == {"settings": settings, "data_dir": str(out), "out_dir": str(tmp_path)}
    assert (lf["lora_rank"], lf["lora_alpha"], ax["lora_r"], ax["lora_alpha"]) == (16, 32, 16, 32)
    assert lf["max_steps"] == ax["max_steps"] == 7 and lf["cutoff_len"] == ax["sequence_len"] == 256
    assert lf["learning_rate"] == ax["learning_rate"] == 5e-3  # a float, not YAML's string "5e-3"
    assert lf["template"] == "empty" and ax["datasets"][0]["type"] == "input_output"
    assert lf["disable_gradient_checkpointing"] is True and ax["gradient_checkpointing"] is False
    assert not any(ax[f"lora_{k}_kernel"] for k in ("qkv", "o", "mlp", "embedding"))  # Triton: GPUs only
