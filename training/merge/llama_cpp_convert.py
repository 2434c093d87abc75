"""Run llama.cpp's convert_hf_to_gguf.py unchanged, with two gaps filled that stop it on our models.

    python -m training.merge.llama_cpp_convert CONVERTER_DIR MODEL_DIR --outfile X.gguf --outtype f32

CONVERTER_DIR holds convert_hf_to_gguf.py, conversion/ and gguf-py/ from the llama-cpp-python
sdist (docker/llama-cpp.sh converter). Everything after it goes to the converter as it is. It
runs in its own process: the converter is a script that owns sys.argv and must import the gguf-py
it ships (PyPI's gguf of the same version number lacks what it uses, e.g. LazyChunkedTensor).

The two gaps, both checked against llama.cpp as vendored by llama-cpp-python 0.3.36:

1. The BPE pre-tokenizer check. The converter recognises a tokenizer by a hash of the token ids
   it gives a test string, so any tokenizer trained for a model of one's own (tiny://, or a new
   vocabulary) is unknown and the converter stops. Where that happens and tokenizer.json says the
   pre-tokenizer is exactly GPT-2's (byte-level, GPT-2's regex, no prefix space, no normalizer),
   llama.cpp's "gpt-2" pre-tokenizer is the same split, so it is used; where it is exactly Qwen2's
   (Qwen2's regex, then byte-level without a regex; NFC or no normalizer, as Qwen2.5's own, which
   llama.cpp also reads as "qwen2" without normalizing), "qwen2"; anything else still stops.
2. GPT-NeoX under transformers 5: AutoConfig's dict has rope_parameters.partial_rotary_factor
   instead of rotary_pct, which the converter's GPT-NeoX class reads, so every GPT-NeoX model
   (Polyglot-ko, OpenCALM) fails with KeyError 'rotary_pct'. It is filled in from the config.

What was done is written as JSON to $QLORA_CONVERT_REPORT (when set) for export.json.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import sys
from pathlib import Path

log = logging.getLogger("qlora-stack.convert")

# tokenizer.json's pre_tokenizer for GPT-2's own split (what `tokenizers` writes for ByteLevel()).
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
REPORT_ENV = "QLORA_CONVERT_REPORT"

report: dict = {"pre_tokenizer_fallback": None, "rotary_pct_filled": None}


# Qwen2's split (Qwen2.5's tokenizer.json, and tiny://qwen2's): its regex, then bytes without GPT-2's.
# llama.cpp's "qwen2" pre-tokenizer (llama-vocab.cpp) is this regex, its (?i:...) spelt out per letter.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False}
QWEN2_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}


def _tokenizer_json(model_dir: Path) -> dict | None:
    path = model_dir / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def is_gpt2_split(model_dir: Path) -> bool:
    tokenizer = _tokenizer_json(model_dir)
    return (
        tokenizer is not None
        and tokenizer.get("normalizer") is None
        and tokenizer.get("pre_tokenizer") == GPT2_PRE_TOKENIZER
    )


def is_qwen2_split(model_dir: Path) -> bool:
    tokenizer = _tokenizer_json(model_dir)
    if tokenizer is None or tokenizer.get("normalizer") not in (None, {"type": "NFC"}):
        return False
    steps = (tokenizer.get("pre_tokenizer") or {}).get("pretokenizers") or []
    if tokenizer["pre_tokenizer"].get("type") != "Sequence" or len(steps) != 2:
        return False
    split, byte_level = steps
    # trim_offsets moves offsets only, not the split: Qwen2.5 has false, `tokenizers`' default is true.
    return split == QWEN2_SPLIT and {k: byte_level.get(k) for k in QWEN2_BYTES} == QWEN2_BYTES


def known_split(model_dir: Path) -> str | None:
    """llama.cpp's pre-tokenizer that splits text exactly as the model's tokenizer.json says."""
    if is_gpt2_split(model_dir):
        return "gpt-2"
    if is_qwen2_split(model_dir):
        return "qwen2"
    return None


def patch(base, gptneox) -> None:
    """Wrap the two converter methods; their own code still does all the work."""
    get_vocab_base_pre = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer):
        try:
            return get_vocab_base_pre(self, tokenizer)
        except NotImplementedError:
            name = known_split(Path(self.dir_model))
            if name is None:
                raise
            log.warning(
                "tokenizer unknown to llama.cpp, but its pre-tokenizer is one llama.cpp has: "
                f"tokenizer.ggml.pre = {name}"
            )
            report["pre_tokenizer_fallback"] = name
            return name

    base.TextModel.get_vocab_base_pre = vocab_base_pre

    set_gguf_parameters = gptneox.GPTNeoXModel.set_gguf_parameters

    def neox_parameters(self):
        if "rotary_pct" not in self.hparams:
            self.hparams["rotary_pct"] = self.rope_parameters.get("partial_rotary_factor", 1.0)
            report["rotary_pct_filled"] = self.hparams["rotary_pct"]
        return set_gguf_parameters(self)

    gptneox.GPTNeoXModel.set_gguf_parameters = neox_parameters


def main() -> None:
    converter_dir = Path(sys.argv.pop(1)).resolve()
    script = converter_dir / "convert_hf_to_gguf.py"
    # The converter's own rule, applied before its modules are imported here: its gguf-py first.
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    import conversion.base as base
    import conversion.gptneox as gptneox

    patch(base, gptneox)
    sys.argv[0] = str(script)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        if os.environ.get(REPORT_ENV):
            Path(os.environ[REPORT_ENV]).write_text(json.dumps(report), encoding="utf-8")


if __name__ == "__main__":
    main()
