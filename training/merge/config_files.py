"""Everything in a merged model directory besides the weights, written for every server.

TGI 3.3.7 (maintenance mode) bundles transformers 4.51, which reads what transformers 5
no longer writes: `torch_dtype` instead of `dtype`, top-level `rope_theta`/`rope_scaling`
instead of `rope_parameters`, the chat template inside tokenizer_config.json instead of
chat_template.jinja, and a known `tokenizer_class`. Both spellings are written, so TGI,
vLLM and transformers 5 all read the same model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer

from training.errors import UserError
from training.merge.safetensors_dtypes import FLOAT8, FLOAT8_WIDENS_TO

# transformers 5's generic fast tokenizer class; 4.x knows the same thing under this name.
_PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def base_dtype(base_dir: Path) -> torch.dtype:
    """The dtype a merged model is written in by default: the base model's own (FP8: bfloat16)."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"{base_dir / 'config.json'}: dtype {name!r} is not a torch floating-point dtype")
    return FLOAT8_WIDENS_TO if dtype in FLOAT8 else dtype


def write_config(out_dir: Path, base_dir: Path, dtype: torch.dtype) -> dict:
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)  # the merged weights are plain floating point
    config.pop("_name_or_path", None)
    config["dtype"] = config["torch_dtype"] = dtype_name(dtype)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return config


def write_tokenizer(out_dir: Path, adapter_dir: Path) -> None:
    """The adapter's tokenizer (it carries the training chat template), readable by TGI too."""

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    tokenizer.save_pretrained(out_dir)
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(tokenizer.chat_template, str):
        config["chat_template"] = tokenizer.chat_template
    cls = config.get("tokenizer_class")
    config["tokenizer_class"] = _PORTABLE_TOKENIZER_CLASS.get(cls, cls)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def write_generation_config(out_dir: Path, base_dir: Path, config: dict) -> None:
    source = base_dir / "generation_config.json"
    if source.is_file():
        shutil.copyfile(source, out_dir / "generation_config.json")
        return
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    generation = {k: config[k] for k in keys if config.get(k) is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
