"""Export a merged model to GGUF with llama.cpp's own tools, verified, with an Ollama Modelfile.

outputs/<run>/gguf/ (training.run_dir names the files), per quantization type Q:
  <run>-Q.gguf          in place only once the export passed
  <run>-Q.export.json   converter and quantizer, tensor types, size, sha256, verification; written
                        last, so its presence means the GGUF beside it is the one it describes
  <run>-Q.Modelfile     FROM ./<run>-Q.gguf, the chat template as a Go template, stops

The merged model is converted once by llama.cpp's convert_hf_to_gguf.py into a lossless GGUF
(its own dtype), which llama.cpp's quantizer turns into each requested type. The chat template
travels in the GGUF's tokenizer.chat_template. Each file is compared with the merged model
(training.merge.verify_gguf) before anything is published; when one fails, none is written.
All work happens in a folder beside gguf/ that is removed at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from serving import mkl_vml
from training.atomic import remove_stale_partials, temp_dir_beside, write_json, write_text
from training.data.templates import PromptTemplate, resolve_template, tokenizer_adds_bos
from training.errors import UserError
from training.merge import llama_cpp
from training.merge.gguf_quants import DEFAULT_QUANT
from training.merge.modelfile import ModelfileError, build_modelfile
from training.merge.verify_gguf import GGUFVerificationError, verify_gguf
from training.run_dir import MERGE_RECORD, RunDir
from training.run_lock import one_command_at_a_time
from training.runinfo import human_size, now, versions

log = logging.getLogger(__name__)

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


@dataclass
class ExportSettings:
    quants: tuple[str, ...] = (DEFAULT_QUANT,)
    verify: bool = True
    force: bool = False
    threads: int | None = None  # llama.cpp's quantizer threads (default: every core)


def _read_merged(merged: Path) -> tuple[dict, dict]:
    """(config.json, merge.json) of a merged model directory, with a clear error when it is none."""
    if not (merged / "config.json").is_file() or not any(merged.glob("*.safetensors")):
        raise UserError(
            f"{merged}: no merged model (config.json and *.safetensors) to export; merge the run first "
            "(make merge), or pass --merged DIR"
        )
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    record_path = merged / MERGE_RECORD
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    return config, record


def _context_length(config: dict, record: dict) -> int | None:
    """Tokens per request as the servers use it: the recipe's max_length, within the model's positions."""
    positions = next((config[k] for k in POSITION_KEYS if isinstance(config.get(k), int)), None)
    length = ((record.get("recipe") or {}).get("data") or {}).get("max_length")
    if isinstance(length, int):
        return min(length, positions) if positions else length
    return positions


def _prompt_template(record: dict, tokenizer) -> tuple[PromptTemplate | None, str | None]:
    """The recipe's prompt template, when the merged model's chat template is exactly its rendering."""
    spec = ((record.get("recipe") or {}).get("data") or {}).get("template")
    template = resolve_template(spec) if spec else None
    if template is not None and tokenizer.chat_template != template.chat_template(
        add_bos=tokenizer_adds_bos(tokenizer)
    ):
        log.warning(
            "The merged model's chat template is not the %s template of its recipe; the Modelfile gets none",
            template.name,
        )
        return None, spec
    return template, spec


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_gguf(merged: str | Path, run: RunDir, settings: ExportSettings) -> dict[str, dict]:
    """Convert, quantize, verify and publish; returns the export record of each quantization type."""
    mkl_vml.warm_up()
    merged = Path(merged)
    config, merge_record = _read_merged(merged)
    converter = llama_cpp.converter_dir()
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    outtype = llama_cpp.LOSSLESS_OUTTYPE.get(dtype)
    if outtype is None:
        raise UserError(
            f"{merged}: dtype {dtype} cannot be converted; re-merge with --dtype float16 or bfloat16"
        )
    # Before the work folder of an earlier export is removed as a killed one's: it may be running.
    with one_command_at_a_time(run, "export"):
        return _export(
            merged,
            run,
            settings,
            merge_record=merge_record,
            context_length=_context_length(config, merge_record),
            converter=converter,
            dtype=dtype,
            outtype=outtype,
        )


def _export(
    merged: Path,
    run: RunDir,
    settings: ExportSettings,
    *,
    merge_record: dict,
    context_length: int | None,
    converter: Path,
    dtype: str,
    outtype: str,
) -> dict[str, dict]:
    remove_stale_partials(run.path, run.gguf_dir.name)
    existing = [run.gguf(q) for q in settings.quants if _exported(run, q)]
    if existing and not settings.force:
        raise UserError(
            f"{', '.join(map(str, existing))} already exist(s); pass --force (make export FORCE=1) to replace"
        )
    tokenizer = AutoTokenizer.from_pretrained(merged)
    template, template_spec = _prompt_template(merge_record, tokenizer)

    started = time.perf_counter()
    work = temp_dir_beside(run.gguf_dir)
    try:
        lossless = llama_cpp.convert(merged, work / f"lossless-{outtype}.gguf", outtype)
        records: dict[str, dict] = {}
        for quant in settings.quants:
            target = work / run.gguf(quant).name
            quantization = llama_cpp.quantize(lossless.path, target, quant.upper(), settings.threads)
            verification = None
            if settings.verify:
                log.info("Verifying %s against %s", target.name, merged)
                verify_started = time.perf_counter()
                try:
                    verification = verify_gguf(merged, target, quant)
                except GGUFVerificationError as e:
                    raise UserError(
                        f"GGUF export of {merged} ({quant}) failed verification, nothing was written: {e}"
                    ) from None
                verification["seconds"] = round(time.perf_counter() - verify_started, 2)
            try:
                modelfile = build_modelfile(
                    target.name, template, template_spec, tokenizer.eos_token, context_length
                )
            except ModelfileError as e:
                raise UserError(f"{run.gguf_modelfile(quant)}: {e}") from None
            records[quant] = {
                "format": "gguf",
                "quant": quant,
                "file": target.name,
                "bytes": target.stat().st_size,
                "sha256": _sha256(target),
                "source": str(merged),
                "source_dtype": dtype,
                "source_bytes": sum(p.stat().st_size for p in merged.glob("*.safetensors")),
                "context_length": context_length,
                "conversion": {
                    "tool": "convert_hf_to_gguf.py",
                    "llama_cpp_python": llama_cpp.llama_cpp_version(),
                    "converter_dir": str(converter),
                    "outtype": lossless.outtype,
                    "seconds": lossless.seconds,
                    "pre_tokenizer_fallback": lossless.pre_tokenizer_fallback,
                    "rotary_pct_filled": lossless.rotary_pct_filled,
                },
                "quantization": {
                    "tool": "llama_model_quantize",
                    "ftype": quantization.ftype,
                    "seconds": quantization.seconds,
                    "tensor_types": llama_cpp.tensor_types(target),
                    "fallback_tensors": len(quantization.fallbacks),
                    "fallbacks": quantization.fallbacks,
                },
                "chat_template": bool(tokenizer.chat_template),
                "modelfile": {
                    "file": run.gguf_modelfile(quant).name,
                    "template": template.name if modelfile.template else None,
                    "stops": list(modelfile.stops),
                    "notes": modelfile.notes,
                },
                "verification": verification,
                "seconds": round(time.perf_counter() - started, 2),
                "versions": {**versions(), "llama-cpp-python": llama_cpp.llama_cpp_version()},
                "created_at": now(),
            }
            write_text(work / run.gguf_modelfile(quant).name, modelfile.text)

        run.gguf_dir.mkdir(parents=True, exist_ok=True)
        for quant, record in records.items():
            _publish(work, run, quant, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log_summary(records, run)
    return records


def _exported(run: RunDir, quant: str) -> bool:
    """A finished export of `quant`: its record is written last. A GGUF without one is what an export
    interrupted while publishing left, and is replaced."""
    if run.gguf(quant).exists() and not run.gguf_record(quant).exists():
        log.warning(
            "%s has no %s (an interrupted export): exporting it again",
            run.gguf(quant),
            run.gguf_record(quant).name,
        )
        return False
    return run.gguf(quant).exists()


def _publish(work: Path, run: RunDir, quant: str, record: dict) -> None:
    """Move one verified type into gguf/: the record last, once the GGUF it describes is in place.

    The record of an earlier export goes first, so that an interruption or a failure in between
    leaves no record describing a GGUF that is not there, or that is the old one.
    """
    run.gguf_record(quant).unlink(missing_ok=True)
    os.replace(work / run.gguf_modelfile(quant).name, run.gguf_modelfile(quant))
    os.replace(work / record["file"], run.gguf(quant))
    write_json(run.gguf_record(quant), record)


def _log_summary(records: dict[str, dict], run: RunDir) -> None:
    lines = [f"GGUF written to {run.gguf_dir}"]
    for quant, r in records.items():
        types = ", ".join(f"{t}x{n}" for t, n in r["quantization"]["tensor_types"].items())
        fallback = r["quantization"]["fallback_tensors"]
        lines.append(f"  {r['file']}  {human_size(r['bytes'])}  tensors {types}")
        if fallback:
            lines.append(
                f"    {fallback} tensor(s) fell back to another type: rows not a multiple of the 256-wide k-quant block"
            )
        v = r["verification"]
        if v:
            lines.append(
                f"    verified: mean KL {v['mean_kl']:.2g} nats/token (tolerance {v['tolerance_mean_kl']:g}), "
                f"top-1 {v['top1_agreement']:.0%}, max |logit diff| {v['max_abs_logit_diff']:.3g}, "
                f"greedy answers identical {v['greedy_identical']}/{len(v['greedy'])}"
            )
        else:
            lines.append("    not verified (--no-verify)")
        lines.append(f"    ollama create {run.name}-{quant} -f {run.gguf_modelfile(quant)}")
    log.info("\n".join(lines))
