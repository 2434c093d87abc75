"""The merge reads the base model's weights exactly as transformers does, FP8 included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.training.merge.test_merge import make_adapter
from training.errors import UserError
from training.merge.coordinator import MergeSettings, merge_adapter
from training.merge.weights import Checkpoint
from training.model.hub_files import SAFETENSORS_INDEX, files_to_download, weight_files


def point_adapter_at(adapter: Path, base: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def tensor_names(model_dir: Path) -> set[str]:
    names = set()
    for file in weight_files(model_dir):
        with safe_open(file, framework="pt") as f:
            names |= set(f.keys())
    return names


def sharded_base_with_extra_files(tmp_path: Path, tiny_dir: Path) -> Path:
    """The tiny Llama saved in shards with an index, beside files transformers does not load: a
    Mistral-style consolidated.safetensors (other tensor names) and a stale file whose name sorts
    after the shards and that holds a zeroed copy of a real tensor."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_dir / "llama").save_pretrained(base, max_shard_size="200KB")
    assert (base / SAFETENSORS_INDEX).is_file()
    embedding = "model.embed_tokens.weight"
    with safe_open(
        base / json.loads((base / SAFETENSORS_INDEX).read_text())["weight_map"][embedding], "pt"
    ) as f:
        real = f.get_tensor(embedding)
    save_file({"tok_embeddings.weight": real.clone()}, base / "consolidated.safetensors")
    save_file({embedding: torch.zeros_like(real)}, base / "zz-stale.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / "llama" / name, base)
    return base


def test_merge_reads_only_the_shards_the_index_names(tmp_path, tiny_dir):
    base = sharded_base_with_extra_files(tmp_path, tiny_dir)
    adapter = make_adapter(tmp_path, tiny_dir, "llama")
    point_adapter_at(adapter, base)
    record = merge_adapter(adapter, tmp_path / "merged", MergeSettings())
    assert record["verification"]["passed"]  # a zeroed embedding read from zz-stale would fail this
    assert tensor_names(tmp_path / "merged") == tensor_names(base)  # no tok_embeddings.weight
    assert {f.name for f in weight_files(base)} == set(
        json.loads((base / SAFETENSORS_INDEX).read_text())["weight_map"].values()
    )


def test_download_list_is_the_index_and_its_shards_or_model_safetensors(tmp_path):
    index = tmp_path / SAFETENSORS_INDEX
    index.write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                    "c": "model-00001-of-00002.safetensors",
                }
            }
        )
    )
    assert files_to_download(index) == [
        "config.json",
        "generation_config.json",
        SAFETENSORS_INDEX,
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert files_to_download(None)[-1] == "model.safetensors"
    index.write_text(json.dumps({"weights": {}}))
    with pytest.raises(UserError, match="not a safetensors index with a weight_map"):
        files_to_download(index)


def test_a_folder_without_model_safetensors_names_what_it_has(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "consolidated.safetensors")
    with pytest.raises(UserError, match=r"no model.safetensors .*consolidated.safetensors"):
        Checkpoint(tmp_path)


def fp8_base(tmp_path: Path, tiny_dir: Path, dtype: torch.dtype) -> Path:
    """The tiny Llama with its linear weights stored in FP8, as FP8 releases store them."""
    base = tmp_path / f"base-{dtype}".replace("torch.", "")
    shutil.copytree(tiny_dir / "llama", base)
    with safe_open(base / "model.safetensors", "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    tensors = {n: t.to(dtype) if n.endswith("proj.weight") else t for n, t in tensors.items()}
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_weights_merge_widened_to_bfloat16_without_loss(tmp_path, tiny_dir, dtype):
    base = fp8_base(tmp_path, tiny_dir, dtype)
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (base / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(tmp_path, tiny_dir, "llama")
    point_adapter_at(adapter, base)
    record = merge_adapter(adapter, tmp_path / "merged", MergeSettings())
    assert record["dtype"] == "bfloat16" and record["verification"]["passed"]
    name = "model.layers.0.self_attn.k_proj.weight"  # not adapted: the FP8 weight itself, widened
    with (
        safe_open(base / "model.safetensors", "pt") as f,
        safe_open(tmp_path / "merged" / "model.safetensors", "pt") as g,
    ):
        original, merged = f.get_tensor(name), g.get_tensor(name)
        assert merged.dtype == torch.bfloat16 and torch.equal(merged.float(), original.float())
        adapted = g.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert adapted.dtype == torch.bfloat16 and not torch.equal(
            adapted.float(), f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
        )


def test_an_unsupported_dtype_names_the_file_and_tensor(tmp_path):
    save_file({"rotary.freqs": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "model.safetensors")
    with pytest.raises(
        UserError, match=r"model.safetensors: tensor rotary.freqs has dtype C64.*supported: F64"
    ):
        Checkpoint(tmp_path)
