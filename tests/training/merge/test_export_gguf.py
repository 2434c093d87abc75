"""GGUF export with llama.cpp's own converter and quantizer, verified against the merged model.

The export-marked tests run llama.cpp for real (make test-export, which builds llama-cpp-python
once and caches it); the others check the pieces around it and run with make test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from serving.backends.llamacpp import gguf_path
from tests.conftest import export_cli, exported_run
from tests.training.merge.ollama_modelfile import create_request
from training.errors import UserError
from training.merge import llama_cpp
from training.merge.export_gguf import ExportSettings, _context_length, export_gguf
from training.merge.gguf_quants import TOLERANCE, parse_quants
from training.merge.llama_cpp_convert import is_gpt2_split, known_split
from training.run_dir import RunDir

export = pytest.mark.export


def record(run: Path, quant: str) -> dict:
    return json.loads(RunDir(run).gguf_record(quant).read_text(encoding="utf-8"))


# --- without llama.cpp ----------------------------------------------------------------------


def test_training_and_serving_name_the_same_gguf_files(tmp_path):
    run = RunDir(tmp_path / "ko-7b")
    assert (
        run.gguf("q4_k_m")
        == gguf_path(tmp_path, "ko-7b", "q4_k_m")
        == tmp_path / "ko-7b/gguf/ko-7b-q4_k_m.gguf"
    )
    assert run.gguf_record("q8_0").name == "ko-7b-q8_0.export.json"
    assert run.gguf_modelfile("f16").name == "ko-7b-f16.Modelfile"


def test_quantization_types_are_checked_before_anything_runs():
    assert parse_quants(["q8_0,Q4_K_M", "q8_0"]) == ("q8_0", "q4_k_m")
    with pytest.raises(
        UserError, match="--quant q3_k: choose from f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m"
    ):
        parse_quants(["q3_k"])
    assert set(TOLERANCE) == {"f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"}


def test_the_context_is_the_recipes_max_length_within_the_models_positions():
    config = {"max_position_embeddings": 2048}
    assert _context_length(config, {"recipe": {"data": {"max_length": 256}}}) == 256
    assert _context_length(config, {"recipe": {"data": {"max_length": 4096}}}) == 2048
    assert _context_length(config, {}) == 2048


def test_only_gpt2s_own_split_gets_llama_cpps_gpt2_pre_tokenizer(tiny_dir, tmp_path):
    assert is_gpt2_split(tiny_dir / "llama") and is_gpt2_split(tiny_dir / "gpt-neox")
    other = tmp_path / "other"
    shutil.copytree(tiny_dir / "llama", other)
    tokenizer = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["pre_tokenizer"]["add_prefix_space"] = True
    (other / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    assert not is_gpt2_split(other)


def test_qwen2s_own_split_gets_llama_cpps_qwen2_pre_tokenizer(tiny_dir, tmp_path):
    """tiny://qwen2 as transformers saves it (a merged model): Qwen2Tokenizer writes Qwen2's split."""
    from transformers import AutoTokenizer

    qwen = tmp_path / "qwen"
    AutoTokenizer.from_pretrained(tiny_dir / "qwen2").save_pretrained(qwen)
    assert known_split(qwen) == "qwen2"
    tokenizer = json.loads((qwen / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["normalizer"] = {"type": "NFKC"}  # llama.cpp's qwen2 does not normalize; NFC text only
    (qwen / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    assert known_split(qwen) is None


# --- with llama.cpp -------------------------------------------------------------------------


@export
def test_export_writes_each_verified_gguf_with_its_record_and_modelfile(quickstart_gguf):
    run, result = quickstart_gguf
    assert result.returncode == 0, result.stderr
    assert f"GGUF written to {run / 'gguf'}" in result.stderr
    from gguf import GGUFReader

    merged_template = (run / "merged" / "chat_template.jinja").read_text(encoding="utf-8")
    for quant in ("f32", "q8_0", "q4_k_m"):
        path = RunDir(run).gguf(quant)
        r = record(run, quant)
        assert r["file"] == path.name and r["bytes"] == path.stat().st_size
        assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert r["conversion"]["tool"] == "convert_hf_to_gguf.py" and r["conversion"]["outtype"] == "f32"
        # The tiny tokenizer is new to llama.cpp, but splits text exactly as GPT-2 does.
        assert r["conversion"]["pre_tokenizer_fallback"] == "gpt-2"
        v = r["verification"]
        assert v["passed"] and v["tokenization_identical"] and v["chat_template_identical"]
        assert v["mean_kl"] <= TOLERANCE[quant].mean_kl == v["tolerance_mean_kl"]
        assert v["positions"] > 100 and len(v["greedy"]) == 3
        fields = GGUFReader(path).fields
        assert fields["tokenizer.chat_template"].contents() == merged_template
        assert fields["general.architecture"].contents() == "llama"
        assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
        request = create_request(RunDir(run).gguf_modelfile(quant).read_text(encoding="utf-8"))
        assert (path.parent / request.from_).resolve() == path.resolve()
        assert request.parameters == {"stop": ["</s>", "ユーザー:"], "num_ctx": ["256"]}
        assert request.template.startswith("{{ range $i, $m := .Messages }}")
    f32 = record(run, "f32")
    assert f32["quantization"]["tensor_types"] == {"F32": 21}
    assert f32["verification"]["mean_kl"] < 1e-5 and f32["verification"]["max_abs_logit_diff"] < 0.05
    assert f32["verification"]["greedy_identical"] == 3
    # Hidden size 128 is not a multiple of the k-quants' 256-wide blocks: most tensors fall back,
    # and the record says so.
    q4 = record(run, "q4_k_m")["quantization"]
    assert q4["fallback_tensors"] == 13 and len(q4["fallbacks"]) == 13
    assert q4["tensor_types"]["Q5_0"] == 12 and q4["tensor_types"]["Q4_K"] == 1
    assert record(run, "q4_k_m")["bytes"] < record(run, "q8_0")["bytes"] < record(run, "f32")["bytes"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no work folder left


@export
def test_gpt_neox_converts_without_rotary_pct_and_without_bos(neox_run, tmp_path):
    run, result = exported_run(neox_run, tmp_path, "q8_0")
    assert result.returncode == 0, result.stderr
    r = record(run, "q8_0")
    assert r["conversion"]["rotary_pct_filled"] == 0.5  # transformers 5 keeps it in rope_parameters
    assert r["verification"]["passed"] and r["verification"]["tokenization_identical"]
    assert r["modelfile"]["template"] == "koalpaca" and r["modelfile"]["stops"] == ["<|endoftext|>", "<usr>"]


@export
def test_a_merged_model_outside_a_run_is_exported_under_its_own_name(quickstart_gguf, tmp_path):
    source, _ = quickstart_gguf
    model = tmp_path / "models" / "my-llama"
    shutil.copytree(source / "merged", model)
    result = export_cli(model, "--quant", "f32", "--no-verify")
    assert result.returncode == 0, result.stderr
    # Named after the model's folder, not after the folder that holds it (models-f32.gguf).
    assert sorted(p.name for p in (tmp_path / "models" / "gguf").iterdir()) == [
        "my-llama-f32.Modelfile",
        "my-llama-f32.export.json",
        "my-llama-f32.gguf",
    ]
    assert "ollama create my-llama-f32 -f" in result.stderr
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["gguf", "my-llama"]


@export
def test_an_existing_export_is_kept_without_force(quickstart_gguf):
    run, _ = quickstart_gguf
    before = RunDir(run).gguf("q8_0").read_bytes()
    again = export_cli(run / "merged", "--quant", "q8_0")
    assert again.returncode == 2 and "already exist" in again.stderr and "--force" in again.stderr
    assert RunDir(run).gguf("q8_0").read_bytes() == before


@export
def test_a_gguf_of_another_model_fails_verification_and_nothing_is_published(
    quickstart_gguf, tiny_dir, tmp_path, monkeypatch
):
    source, _ = quickstart_gguf
    run = RunDir(tmp_path / "quickstart")
    shutil.copytree(source / "merged", run.merged)
    convert = llama_cpp.convert
    # The converter is handed the base model instead of the merged one: a plausible file that
    # computes something else (the LoRA update is missing).
    monkeypatch.setattr(
        llama_cpp, "convert", lambda merged, out, outtype: convert(tiny_dir / "llama", out, outtype)
    )
    with pytest.raises(UserError, match=r"\(f32\) failed verification, nothing was written: .*mean KL"):
        export_gguf(run.merged, run, ExportSettings(quants=("f32",)))
    assert not run.gguf_dir.exists()
    assert sorted(p.name for p in run.path.iterdir()) == ["merged"]


@export
def test_a_tokenizer_llama_cpp_cannot_match_still_stops_the_converter(tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir / "llama", model)
    tokenizer = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["pre_tokenizer"]["add_prefix_space"] = True  # not GPT-2's split any more
    (model / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    with pytest.raises(UserError, match="BPE pre-tokenizer was not recognized"):
        llama_cpp.convert(model, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


@export
def test_without_the_converter_the_error_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_CONVERTER", str(tmp_path))
    with pytest.raises(
        UserError, match=r"missing convert_hf_to_gguf.py, conversion, gguf-py.*make venv-export"
    ):
        llama_cpp.converter_dir()
    monkeypatch.delenv("LLAMA_CPP_CONVERTER")
    monkeypatch.setenv("LLAMA_CPP_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=f"not in {tmp_path}/converter-0.3.36"):
        llama_cpp.converter_dir()


@export
def test_a_forced_export_that_fails_while_publishing_leaves_no_record_of_a_gguf_not_there(
    quickstart_gguf, tmp_path
):
    """The record goes last, the earlier one first: a failure between the two (here the GGUF cannot be
    moved into place, a folder being in its way) leaves no record describing a GGUF that is not there,
    or the old one. The next export makes the type again without --force: it was not finished."""
    source, _ = quickstart_gguf
    run = RunDir(tmp_path / "quickstart")
    shutil.copytree(source / "merged", run.merged)
    run.gguf_dir.mkdir()
    shutil.copy(source / "gguf" / "quickstart-f32.export.json", run.gguf_record("f32"))  # an earlier export
    run.gguf("f32").mkdir()
    with pytest.raises(IsADirectoryError):
        export_gguf(run.merged, run, ExportSettings(quants=("f32",), verify=False, force=True))
    assert not run.gguf_record("f32").exists()

    run.gguf("f32").rmdir()
    shutil.copy(source / "gguf" / "quickstart-f32.gguf", run.gguf("f32"))  # in place, its record not yet
    export_gguf(run.merged, run, ExportSettings(quants=("f32",), verify=False))
    assert record(run.path, "f32")["sha256"] == hashlib.sha256(run.gguf("f32").read_bytes()).hexdigest()
