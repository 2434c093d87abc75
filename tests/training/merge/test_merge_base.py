"""The merge base: original weights or their NF4 round trip, and the auto choice between them."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors import safe_open

from tests.training.conftest import quickstart_recipe
from training.errors import UserError
from training.merge.coordinator import MergeSettings, merge_adapter
from training.merge.nf4 import round_trip_of_run
from training.model.loading import Device, load_model
from training.recipe import ModelSection, QuantizationSection
from training.release.evaluate import evaluate, write_report

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


def test_both_bases_merge_verified_and_evaluate(quickstart_run, both_bases, tmp_path):
    out, records = both_bases
    for record in records.values():  # the default check, layer by layer, on both bases
        assert record["verification"]["passed"] and record["verification"]["mode"] == "streamed"
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
    # Each check says what it compared with what, so that "greedy tokens identical" after the merge
    # and a lower agreement here do not read as a contradiction.
    assert records["original"]["verification"]["compared_with"] == (
        "the original base in float32 + adapter (not the 4-bit model training ran)"
    )
    assert records["nf4-roundtrip"]["verification"]["compared_with"] == "the 4-bit base + adapter, as trained"
    table = write_report(report, tmp_path / "eval.json", tmp_path / "eval.png")
    assert "greedy answers identical to those of 'adapter (nf4)', the model as trained" in table
    assert "'merged (original)' holds the adapter folded into the original full-precision weights" in table
    assert "'merged (nf4-roundtrip)' holds" not in table


def test_merge_summary_says_what_it_verified_against(quickstart_run, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        merge_adapter(quickstart_run / "adapter", tmp_path / "merged", MergeSettings())
    assert "verified     against the original base in float32 + adapter (not the 4-bit model" in caplog.text
    assert "next tokens identical on 3 prompts (streamed, " in caplog.text  # the default check
    with caplog.at_level(logging.INFO):
        merge_adapter(quickstart_run / "adapter", tmp_path / "full", MergeSettings(verify="full"))
    assert "greedy tokens identical on 3 prompts (full, " in caplog.text


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
