"""Merge: the merged model computes what base + adapter computes, on both paths, written atomically."""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from serving.backends.tgi_checks import check_serving
from training.data.templates import BUILTIN_TEMPLATES, tokenizer_adds_bos
from training.errors import UserError
from training.merge.coordinator import MergeSettings, merge_adapter

PROMPT = "<usr> 안녕하세요, 오늘 날씨 어때요?\n<bot>"


def make_adapter(tmp_path: Path, tiny_dir: Path, arch: str = "llama", **lora) -> Path:
    """A LoRA adapter with random, non-zero factors (as after training), saved the way peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / arch)
    targets = ["query_key_value", "dense"] if arch == "gpt-neox" else ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **lora)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:  # trained magnitudes differ from the initial norms
                param.mul_(1 + 0.1 * torch.randn_like(param))
            elif "lora_" in name:
                param.mul_(0.3)
    out = tmp_path / f"{arch}-adapter"
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / arch)
    tokenizer.chat_template = BUILTIN_TEMPLATES["koalpaca"].chat_template(tokenizer_adds_bos(tokenizer))
    tokenizer.save_pretrained(out)
    return out


def base_plus_adapter_logits(tiny_dir: Path, arch: str, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir / arch), adapter)
    with torch.no_grad():
        return model(ids).logits


def merged_logits(merged: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(merged)(ids).logits


def prompt_ids(tiny_dir: Path, arch: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / arch)(PROMPT, return_tensors="pt").input_ids


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
@pytest.mark.parametrize(
    "variant",
    [{}, {"use_rslora": True}, {"use_dora": True}, {"use_dora": True, "use_rslora": True}],
    ids=["lora", "rslora", "dora", "dora+rslora"],
)
def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_dir, arch, variant):
    adapter = make_adapter(tmp_path, tiny_dir, arch, **variant)
    record = merge_adapter(adapter, tmp_path / "merged", MergeSettings())
    assert record["strategy"] == "streaming" and record["verification"]["passed"]

    ids = prompt_ids(tiny_dir, arch)
    expected = base_plus_adapter_logits(tiny_dir, arch, adapter, ids)
    base_only = merged_logits(tiny_dir / arch, ids)
    assert not torch.allclose(expected, base_only, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(merged_logits(tmp_path / "merged", ids), expected, atol=1e-4, rtol=1e-4)


def test_streaming_and_peft_paths_write_the_same_tensors(tmp_path, tiny_dir):
    adapter = make_adapter(tmp_path, tiny_dir, "gpt-neox", use_dora=True, bias="lora_only")
    streaming = merge_adapter(
        adapter, tmp_path / "streaming", MergeSettings(strategy="streaming", verify=False)
    )
    peft = merge_adapter(adapter, tmp_path / "peft", MergeSettings(strategy="peft", verify=False))
    assert (streaming["strategy"], peft["strategy"]) == ("streaming", "peft")

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    a, b = tensors(tmp_path / "streaming"), tensors(tmp_path / "peft")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_trained_adapter_merges_and_generates_the_same_greedy_tokens(quickstart_run, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    record = merge_adapter(quickstart_run / "adapter", merged, MergeSettings())
    assert record["base_model"] == "tiny://llama" and record["recipe"]["data"]["template"] == "dolly-ja"

    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "日本の首都はどこですか?"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        prompt == "<s>ユーザー:日本の首都はどこですか?\nシステム:"
    )  # the training format travels with the model
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir / "llama"), quickstart_run / "adapter"
    )
    plain = AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=12, do_sample=False)
        got = plain.generate(ids, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()


def test_merged_directory_has_what_servers_need(quickstart_run, tmp_path):
    merged = tmp_path / "merged"
    merge_adapter(quickstart_run / "adapter", merged, MergeSettings(verify=False))
    names = {p.name for p in merged.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "merge.json",
    } <= names
    assert "adapter_config.json" not in names and not [
        n for n in names if n.endswith((".bin", ".pt", ".pth"))
    ]
    config = json.loads((merged / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # for TGI's transformers 4.51
    tokenizer_config = json.loads((merged / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == (merged / "chat_template.jinja").read_text()
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert check_serving(merged).ok


def test_tied_embeddings_get_an_explicit_output_head(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tmp_path, tiny_dir, "llama-tied")
    merged = tmp_path / "merged"
    merge_adapter(adapter, merged, MergeSettings())
    config = json.loads((merged / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()
        torch.testing.assert_close(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    ids = prompt_ids(tiny_dir, "llama-tied")
    expected = base_plus_adapter_logits(tiny_dir, "llama-tied", adapter, ids)
    torch.testing.assert_close(merged_logits(merged, ids), expected, atol=1e-4, rtol=1e-4)
    assert AutoModelForCausalLM.from_pretrained(merged).config.tie_word_embeddings


def test_bounded_shards_with_index_and_16bit_output(tmp_path, tiny_dir):
    adapter = make_adapter(tmp_path, tiny_dir, "llama")
    merged = tmp_path / "merged"
    record = merge_adapter(adapter, merged, MergeSettings(dtype="bfloat16", max_shard_size="300KB"))
    assert len(record["weights"]["shards"]) > 1 and record["verification"]["passed"]
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(record["weights"]["shards"])
    for shard in record["weights"]["shards"]:
        assert (merged / shard).stat().st_size <= 300_000 + 64 * 2048 * 2  # at most one tensor over the bound
    config = json.loads((merged / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    ids = prompt_ids(tiny_dir, "llama")
    expected = base_plus_adapter_logits(tiny_dir, "llama", adapter, ids)
    got = merged_logits(merged, ids).float()
    assert (got - expected).abs().max() / expected.abs().max() < 5e-2


def test_modules_to_save_falls_back_to_peft(tmp_path, tiny_dir, caplog):
    adapter = make_adapter(tmp_path, tiny_dir, "llama", modules_to_save=["lm_head"])
    record = merge_adapter(adapter, tmp_path / "merged", MergeSettings())
    assert record["strategy"] == "peft" and "modules_to_save" in record["strategy_reason"]
    assert record["verification"]["passed"]
    with pytest.raises(UserError, match="streaming merge cannot fold"):
        merge_adapter(adapter, tmp_path / "m2", MergeSettings(strategy="streaming"))


def test_existing_output_replaced_only_with_force(quickstart_run, tmp_path):
    merged = tmp_path / "merged"
    merge_adapter(quickstart_run / "adapter", merged, MergeSettings(verify=False))
    (merged / "from-the-first-merge").write_text("")
    with pytest.raises(UserError, match="already exists; pass --force"):
        merge_adapter(quickstart_run / "adapter", merged, MergeSettings(verify=False))
    assert (merged / "from-the-first-merge").exists()
    merge_adapter(quickstart_run / "adapter", merged, MergeSettings(verify=False), force=True)
    assert not (merged / "from-the-first-merge").exists() and (merged / "merge.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no leftovers beside it


def test_killed_merge_leaves_no_complete_looking_directory(quickstart_run, tmp_path):
    merged = tmp_path / "merged"
    cmd = [
        sys.executable,
        "-m",
        "training",
        "merge",
        "--adapter",
        str(quickstart_run / "adapter"),
        "--out",
        str(merged),
    ]
    rng = random.Random(3)
    for _ in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        partial = None
        deadline = time.time() + 60
        while partial is None and proc.poll() is None and time.time() < deadline:
            partial = next(tmp_path.glob(".merged.partial-*"), None)
            time.sleep(0.01)
        time.sleep(
            rng.uniform(0, 0.5)
        )  # somewhere while weights, tokenizer or verification are being written
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not merged.exists() or (merged / "merge.json").is_file()
        if merged.exists():
            shutil.rmtree(merged)
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (merged / "merge.json").is_file() and not list(tmp_path.glob(".merged.*"))


def test_a_merge_that_runs_out_of_space_names_the_file_and_leaves_nothing(quickstart_run, tmp_path):
    """A full disk, as a file size limit (no root needed): the weights' own writes named no file."""

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # config.json fits, weights do not

    cmd = [sys.executable, "-m", "training", "merge", "--adapter", str(quickstart_run / "adapter")]
    result = subprocess.run(
        [*cmd, "--out", str(tmp_path / "merged")], preexec_fn=small_files, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        f"error: {tmp_path}/.merged.partial-" in result.stderr
        and "model.safetensors: File too large" in result.stderr
    )
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_a_merge_whose_tokenizer_the_disk_cannot_hold_names_the_folder_in_one_line_and_leaves_nothing(
    tmp_path, tiny_dir
):
    """A full disk once the weights are written, as a file size limit (no root needed) that every
    weight file fits and tokenizer.json (132 KB) does not: tokenizers' own error ended in a traceback.
    A narrow model (8 wide), in shards of at most 70 KB, keeps each weight file below the limit."""
    adapter = make_adapter(tmp_path, narrow_model(tmp_path, tiny_dir), "narrow")
    merged = tmp_path / "out" / "merged"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    merge = ["merge", "--adapter", str(adapter), "--out", str(merged), "--max-shard-size", "70KB"]
    result = subprocess.run(
        [sys.executable, "-m", "training", *merge], preexec_fn=small_files, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {merged}: File too large. Free space there" in result.stderr
    assert "Traceback" not in result.stderr and list(merged.parent.iterdir()) == []


def narrow_model(tmp_path: Path, tiny_dir: Path) -> Path:
    """tiny://llama's tokenizer on a model 8 wide: each weight is smaller than tokenizer.json."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_dir / "llama")
    config.update({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "head_dim": 4})
    folder = tmp_path / "models" / "narrow"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_dir / "llama").save_pretrained(folder)
    return tmp_path / "models"


def test_gptq_base_is_refused(tmp_path, tiny_dir):
    adapter = make_adapter(tmp_path, tiny_dir, "llama")
    base = tmp_path / "gptq-base"
    shutil.copytree(tiny_dir / "llama", base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(UserError, match="gptq-quantized; a merge needs full-precision base weights"):
        merge_adapter(adapter, tmp_path / "merged", MergeSettings())


def test_check_serving_rejects_heads_not_divisible_by_shards(quickstart_run, tmp_path):
    merged = tmp_path / "merged"
    merge_adapter(quickstart_run / "adapter", merged, MergeSettings(verify=False))
    assert check_serving(merged, num_shard=2).ok  # 2 heads, 2 kv heads
    report = check_serving(merged, num_shard=4)
    assert not report.ok and "num_key_value_heads=2" in report.format()
    result = subprocess.run(
        [sys.executable, "-m", "training", "check-serving", str(merged), "--num-shard", "3"],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 1
        and "FAIL sharding" in result.stdout
        and "num_attention_heads=2" in result.stdout
    )


def test_check_serving_names_what_tgi_cannot_read(quickstart_run, tmp_path):
    merged = tmp_path / "merged"
    merge_adapter(quickstart_run / "adapter", merged, MergeSettings(verify=False))
    tokenizer_config = json.loads((merged / "tokenizer_config.json").read_text())
    del tokenizer_config["chat_template"]
    (merged / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    shutil.copy(quickstart_run / "adapter" / "adapter_config.json", merged)
    report = check_serving(merged)
    failed = {c.name for c in report.checks if c.status == "fail"}
    assert failed == {"chat template", "not an adapter"}


def test_merge_cli_errors_are_clear(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training", "merge", "--adapter", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 2
        and "not an adapter directory" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_binary_shard_sizes_the_recipe_accepts_are_written(tmp_path, tiny_dir):
    # merge.max_shard_size: 300KiB validated, then huggingface_hub's parser (KB/MB/GB/TB only)
    # failed with a ValueError traceback once the weights were written.
    adapter = make_adapter(tmp_path, tiny_dir, "llama")
    record = merge_adapter(adapter, tmp_path / "merged", MergeSettings(max_shard_size="300KiB", verify="off"))
    assert (
        len(record["weights"]["shards"]) > 1
        and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    )


@pytest.mark.parametrize(
    ("argument", "says"),
    [
        (["--max-shard-size", "10XB"], "argument --max-shard-size: '10XB': give a size above 0 in B, KB"),
        (["--num-shard", "0"], "argument --num-shard: '0' is not a number of GPUs"),
    ],
)
def test_merge_cli_refuses_bad_sizes_before_loading(tmp_path, argument, says):
    result = subprocess.run(
        [sys.executable, "-m", "training", "merge", *argument, "--out", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "merged").exists()
