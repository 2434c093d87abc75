"""The streamed verification: layer by layer, it computes what the loaded models compute, and it
catches (and names) a merged model with one wrong layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.training.merge.test_merge import make_adapter
from training.errors import UserError
from training.merge.adapters import read_adapter
from training.merge.coordinator import MergeSettings, merge_adapter
from training.merge.verify import MergeVerificationError, verify_merge
from training.merge.verify.layerwise import BlockWeights, checkpoint_names, empty_model
from training.merge.verify.probes import prompt_ids
from training.merge.verify.streamed import LibraryReader, _merged_logits, _reference_logits


def loaded_logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(ids).logits for ids in prompts]


@pytest.mark.parametrize(
    ("arch", "variant"),
    [("llama", {}), ("llama-tied", {}), ("gpt-neox", {"use_dora": True})],
    ids=["llama", "llama-tied", "gpt-neox-dora"],
)
def test_streamed_logits_are_the_loaded_models_logits(tmp_path, tiny_dir, arch, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = make_adapter(tmp_path, tiny_dir, arch, **variant)
    merged = tmp_path / "merged"
    record = merge_adapter(adapter_dir, merged, MergeSettings())
    verification = record["verification"]
    assert verification["mode"] == "streamed" and "fallback_reason" not in verification
    assert verification["passed"] and verification["tokens"] > 20

    adapter = read_adapter(adapter_dir)
    prompts = prompt_ids(AutoTokenizer.from_pretrained(merged))
    cpu = torch.device("cpu")
    reference, _ = _reference_logits(tiny_dir / arch, adapter, None, prompts, cpu)
    got, _ = _merged_logits(merged, adapter, prompts, cpu)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir / arch), adapter_dir)
    # Packed prompts, one block at a time: the same logits as each prompt through the loaded model.
    for streamed, loaded in zip(reference, loaded_logits(peft_model, prompts), strict=True):
        torch.testing.assert_close(streamed, loaded, atol=1e-5, rtol=1e-5)
    for streamed, loaded in zip(
        got, loaded_logits(AutoModelForCausalLM.from_pretrained(merged), prompts), strict=True
    ):
        torch.testing.assert_close(streamed, loaded, atol=1e-5, rtol=1e-5)


def test_one_decoder_layer_in_memory_at_a_time(tiny_dir):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_dir / "llama"
    model = empty_model(model_dir, torch.float32)
    files = LibraryReader(model_dir)
    names = checkpoint_names(model, list(files.tensors))
    resident: list[list[str]] = []

    def source(name: str, out: torch.Tensor, rows: range | None) -> None:
        files.read_into(names[name], out, rows)
        resident.append([n for n, p in model.named_parameters() if p.device.type != "meta"])

    ids = torch.arange(3, 40).unsqueeze(0)
    weights = BlockWeights(source, torch.device("cpu"))
    weights.attach(model, model)
    with torch.no_grad():
        logits = model(ids).logits
    weights.detach()

    assert resident and all(p.device.type == "meta" for p in model.parameters())  # all given back
    for names_now in resident:
        layers = {n.split(".")[2] for n in names_now if n.startswith("model.layers.")}
        others = [n for n in names_now if not n.startswith("model.layers.")]
        assert len(layers) <= 1 and not (layers and others), names_now
    torch.testing.assert_close(
        logits, loaded_logits(AutoModelForCausalLM.from_pretrained(model_dir), [ids])[0]
    )


def rewrite(model_dir: Path, name: str, value: torch.Tensor) -> None:
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    assert tensors[name].shape == value.shape
    tensors[name] = value.to(tensors[name].dtype).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("arch", "layer", "wrong"),
    [
        ("llama", "model.layers.1", "model.layers.1.mlp.down_proj.weight"),
        ("gpt-neox", "gpt_neox.layers.0", "gpt_neox.layers.0.attention.dense.weight"),
    ],
)
def test_a_merged_model_with_one_wrong_layer_fails_and_the_layer_is_named(
    tmp_path, tiny_dir, arch, layer, wrong
):
    adapter_dir = make_adapter(tmp_path, tiny_dir, arch)
    merged = tmp_path / "merged"
    merge_adapter(adapter_dir, merged, MergeSettings(verify="off"))
    adapter = read_adapter(adapter_dir)
    assert verify_merge("streamed", tiny_dir / arch, adapter, merged, torch.float32)["passed"]

    # The bug this guards against: one module of one layer written without its adapter delta.
    rewrite(merged, wrong, load_file(tiny_dir / arch / "model.safetensors")[wrong])
    with pytest.raises(MergeVerificationError, match=rf"first block whose output differs is {layer} "):
        verify_merge("streamed", tiny_dir / arch, adapter, merged, torch.float32)
    with pytest.raises(MergeVerificationError, match="disagrees with base \\+ adapter"):
        verify_merge("full", tiny_dir / arch, adapter, merged, torch.float32)


def test_a_wrong_output_head_is_named_as_such(tmp_path, tiny_dir):
    adapter_dir = make_adapter(tmp_path, tiny_dir, "llama")
    merged = tmp_path / "merged"
    merge_adapter(adapter_dir, merged, MergeSettings(verify="off"))
    head = load_file(merged / "model.safetensors")["lm_head.weight"]
    rewrite(merged, "lm_head.weight", head * 1.01)
    with pytest.raises(MergeVerificationError, match="every decoder layer's output agrees: .* output head"):
        verify_merge("streamed", tiny_dir / "llama", read_adapter(adapter_dir), merged, torch.float32)


def test_verify_setting_is_checked():
    with pytest.raises(UserError, match="merge verify 'partial': allowed are streamed, full, off"):
        MergeSettings(verify="partial")
    assert MergeSettings(verify=False).verify == "off" and MergeSettings(verify=True).verify == "streamed"
