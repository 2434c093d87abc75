"""Merge bases measured: the NF4 round trip, perplexity and answers, auto choice, publishing."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from training.errors import UserError
from training.evaluate import evaluate
from training.merge import MergeSettings, merge_adapter
from training.model import Device, load_model
from training.nf4 import round_trip_of_run
from training.recipe import ModelSection, QuantizationSection, load_recipe

CPU = Device("cpu", "cpu", 1, False)


@pytest.mark.parametrize(("method", "double"), [("nf4", True), ("fp4", False)])
def test_round_trip_equals_bitsandbytes_own_quantization(tiny_dir, method, double):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    quantization = QuantizationSection(method=method, double_quant=double)
    model, report = load_model(ModelSection(name="tiny://llama"), quantization, CPU, torch.float32)
    run = {"recipe": {"quantization": quantization.model_dump()}, "model": report, "compute_dtype": "float32"}
    round_trip = round_trip_of_run(run, "test")
    with safe_open(tiny_dir / "llama" / "model.safetensors", "pt") as f:
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                loaded = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
                assert torch.equal(round_trip(f.get_tensor(f"{name}.weight")), loaded), name
    assert round_trip.modules == frozenset(report["quantized_modules"]) and len(round_trip.modules) == 14


def test_round_trip_needs_4bit_training():
    run = {"recipe": {"quantization": {"method": "int8"}}, "model": {}, "compute_dtype": "float32"}
    with pytest.raises(UserError, match="only applies to 4-bit"):
        round_trip_of_run(run, "adapter")
    with pytest.raises(UserError, match="needs the run.json"):
        round_trip_of_run({}, "adapter")


@pytest.fixture(scope="module")
def both_bases(quickstart_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bases")
    records = {
        base: merge_adapter(quickstart_run / "adapter", out / base, MergeSettings(base=base))
        for base in ("original", "nf4-roundtrip")
    }
    return out, records


def quickstart_recipe(run_dir):
    return load_recipe("recipes/quickstart.yaml", [f"output.dir={run_dir.parent}"])


def test_both_bases_merge_verified_and_evaluate(quickstart_run, both_bases):
    out, records = both_bases
    assert (
        records["nf4-roundtrip"]["verification"]["passed"] and records["original"]["verification"]["passed"]
    )
    report = evaluate(
        quickstart_recipe(quickstart_run),
        ["base", "adapter", str(out / "original"), str(out / "nf4-roundtrip")],
    )
    models = report["models"]
    assert set(models) == {"base", "adapter (nf4)", "merged (original)", "merged (nf4-roundtrip)"}
    assert all(
        math.isfinite(r["perplexity"]) and r["tokens"] == models["base"]["tokens"] for r in models.values()
    )
    # The round-trip merge computes what the 4-bit model computed in training.
    assert models["merged (nf4-roundtrip)"]["perplexity"] == pytest.approx(
        models["adapter (nf4)"]["perplexity"], rel=1e-5
    )
    assert models["merged (nf4-roundtrip)"]["agreement_with_trained"] == 1.0
    assert models["base"]["perplexity"] > models["adapter (nf4)"]["perplexity"]  # training helped


def test_eval_perplexity_matches_a_direct_computation(quickstart_run):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from training.evaluate import eval_data

    recipe = quickstart_recipe(quickstart_run)
    report = evaluate(recipe, ["adapter"], prompts=0)
    model, _ = load_model(recipe.model, recipe.quantization, CPU, torch.float32)
    model = PeftModel.from_pretrained(model, quickstart_run / "adapter").eval()
    data = eval_data(recipe, AutoTokenizer.from_pretrained(quickstart_run / "adapter"))
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


def test_auto_records_both_perplexities_and_keeps_the_lower(quickstart_run, tmp_path):
    record = merge_adapter(
        quickstart_run / "adapter", tmp_path / "merged", MergeSettings(base="auto", verify=False)
    )
    choice = record["base_choice"]
    assert set(choice["perplexity"]) == {"original", "nf4-roundtrip"}
    assert choice["chosen"] == min(choice["perplexity"], key=choice["perplexity"].get) == record["merge_base"]
    saved = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert saved["base_choice"] == choice
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the other candidate is gone


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
    report = json.loads((quickstart_run / "eval.json").read_text())
    assert report["prompts"] == 2 and len(report["models"]["base"]["answers"]) == 2
    assert (quickstart_run / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_without_validation_split_says_how_to_fix(quickstart_run):
    recipe = load_recipe(
        "recipes/quickstart.yaml", [f"output.dir={quickstart_run.parent}", "data.validation=null"]
    )
    with pytest.raises(UserError, match="no validation split"):
        evaluate(recipe, ["base"])


def test_upload_folder_and_card_name_base_model_and_data(quickstart_run, both_bases, tmp_path):
    from huggingface_hub import ModelCard

    from training.publish import build_upload_folder

    out, _ = both_bases
    folder = build_upload_folder(quickstart_run, "adapter", "someone/quickstart-lora")
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "run.json"} <= names
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft" and "qlora" in card.data.tags
    assert "tiny://llama" in card.text and "data/ja_dolly.jsonl" in card.text and "dolly-ja" in card.text
    assert "--lora-adapters quickstart-lora=someone/quickstart-lora" in card.text  # TGI multi-LoRA
    assert "vllm/vllm-openai" in card.text and "/v1/chat/completions" in card.text


def test_card_metadata_names_hub_base_model_and_dataset():
    from training.model_card import build_card

    run = json.loads(json.dumps(SAMPLE_RUN))
    card = build_card("merged", "me/ko-llama", run, None, None)
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert card.data.datasets == ["heegyu/open-korean-instructions"]
    assert "--model-id me/ko-llama --num-shard 1" in card.text


def test_push_without_the_hub_leaves_the_folder_ready(quickstart_run, tmp_path):
    token = tmp_path / "token"
    token.write_text("hf_not_a_real_token\n")
    cmd = [
        sys.executable,
        "-m",
        "training",
        "push",
        "--set",
        f"output.dir={quickstart_run.parent}",
        "--what",
        "adapter",
        "--repo-id",
        "someone/x",
        "--token-file",
        str(token),
    ]
    offline = subprocess.run(cmd, capture_output=True, text=True)
    assert offline.returncode == 3 and "could not connect to the Hugging Face Hub" in offline.stderr
    assert "the folder to upload is ready at" in offline.stderr
    refused = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert refused.returncode == 3 and "Connection refused" in refused.stderr
    assert (quickstart_run / "upload" / "adapter" / "README.md").is_file()
    empty = tmp_path / "empty"
    empty.write_text("")
    no_token = subprocess.run([*cmd[:-1], str(empty)], capture_output=True, text=True)
    assert no_token.returncode == 2 and "is empty" in no_token.stderr


SAMPLE_RUN = {
    "recipe": {
        "model": {"name": "meta-llama/Llama-2-7b-hf", "revision": None},
        "quantization": {"method": "nf4", "double_quant": True},
        "lora": {"r": 64, "alpha": 16, "dropout": 0.1},
        "data": {
            "source": "heegyu/open-korean-instructions",
            "split": "train[:10%]",
            "format": "text",
            "template": "koalpaca",
        },
    },
    "model": {"lora_target_modules": ["q_proj", "v_proj"]},
    "data": {
        "train": {"rows": 10, "rows_skipped_bad": 0, "rows_over_max_length": 1},
        "eval": None,
        "max_length": 2048,
        "completion_only_loss": False,
    },
    "metrics": {
        "global_step": 100,
        "epoch": 3.0,
        "train_loss_first": 2.0,
        "train_loss_last": 1.0,
        "eval_loss": None,
    },
    "device": {"name": "NVIDIA H100"},
    "versions": {"transformers": "5.23.0", "peft": "0.21.2", "trl": "1.16.0", "bitsandbytes": "0.50.2"},
}
