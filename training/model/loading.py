"""Load the base model and tokenizer as the recipe asks, and prove the quantization applied.

A 4-bit load that silently falls back to full precision (an old bitsandbytes, a
quantization config that never reached from_pretrained) is only noticed when the GPU runs
out of memory. After loading we count the bitsandbytes layers and report the memory
footprint next to what the same model would take in 16-bit.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import traceback
from dataclasses import dataclass

import bitsandbytes as bnb
import httpx2
import torch
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from training.errors import ModelLoadError
from training.model.tiny import resolve_model_name
from training.recipe import ModelSection, QuantizationSection
from training.runinfo import human_size

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Device:
    type: str  # "cuda" or "cpu"
    name: str
    count: int
    bf16: bool

    def as_dict(self) -> dict:
        return {"type": self.type, "name": self.name, "count": self.count, "bf16": self.bf16}


def detect_device() -> Device:
    if torch.cuda.is_available():
        return Device(
            "cuda", torch.cuda.get_device_name(0), torch.cuda.device_count(), torch.cuda.is_bf16_supported()
        )
    return Device("cpu", "cpu", 1, False)


def compute_dtype(requested: str, device: Device) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16; always fp32 on the CPU (16-bit CPU math is slow)."""
    if device.type == "cpu":
        if requested not in ("auto", "float32"):
            log.info("No CUDA device: computing in float32 on the CPU instead of %s", requested)
        return torch.float32
    if requested == "auto":
        return torch.bfloat16 if device.bf16 else torch.float16
    if requested == "bfloat16" and not device.bf16:
        raise ModelLoadError(
            f"model.dtype bfloat16: the GPU ({device.name}) does not support bf16; use float16"
        )
    return DTYPES[requested]


def quantization_config(q: QuantizationSection, dtype: torch.dtype, *, sharded: bool = False):
    """bitsandbytes settings; `sharded` (FSDP, ZeRO-3) stores the packed 4-bit weights as `dtype`.

    FSDP and ZeRO-3 shard only floating-point tensors of one dtype per unit; stored as the compute
    dtype, the packed weights (same bytes, 4 values per bf16 element) shard with the rest.
    """

    if q.method in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.method,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8,
        )
    if q.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(cfg: ModelSection):

    name = resolve_model_name(cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as e:
        explained = _explained(cfg, "tokenizer", e)
        if explained is e:
            raise
        raise explained from e
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss by the collator, so EOS is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    cfg: ModelSection,
    q: QuantizationSection,
    device: Device,
    dtype: torch.dtype,
    *,
    sharded: bool = False,
    local_rank: int | None = None,
):
    """Load the base model; `sharded` for FSDP/ZeRO-3, `local_rank` for this process's GPU under a launcher."""

    name = resolve_model_name(cfg.name)
    kwargs = {
        "revision": cfg.revision,
        "dtype": dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "attn_implementation": cfg.attn_implementation,
    }
    if q.method == "gptq":
        _require_gptq_kernels(device)
    else:
        kwargs["quantization_config"] = quantization_config(q, dtype, sharded=sharded)
    if device.type == "cuda" and not sharded:
        # The whole model on this process's own GPU (with DDP, one copy per GPU). FSDP and DeepSpeed
        # place the shards themselves; bitsandbytes still quantizes on the current GPU.
        kwargs["device_map"] = {"": torch.cuda.current_device() if local_rank is None else local_rank}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as e:
        explained = _explained(cfg, "model", e)
        if explained is e:
            raise
        raise explained from e
    report = verify_quantization(model, q.method)
    disable_cpu_4bit_repacking(model)
    log.info(
        "Loaded %s: %s, %d quantized linear layers, memory footprint %s (16-bit would be %s)",
        cfg.name,
        report["description"],
        report["quantized_layers"],
        human_size(report["footprint_bytes"]),
        human_size(report["fp16_equivalent_bytes"]),
    )
    return model, report


def verify_quantization(model, method: str) -> dict:
    """Fail loudly unless every linear layer of the decoder blocks carries the requested quantization."""

    layer_types = {"nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
    quantized, plain = [], []
    full_precision_params = 0
    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            quantized.append(name)
            full_precision_params += module.in_features * module.out_features
        elif isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
            plain.append(name)
    for module in model.modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            full_precision_params += sum(p.numel() for p in module.parameters(recurse=False))

    expected = layer_types.get(method)
    if expected is not None:
        wrong = [n for n, m in model.named_modules() if n in quantized and not isinstance(m, expected)]
        if not quantized or plain or wrong:
            raise ModelLoadError(
                f"quantization.method is {method}, but the model did not load quantized: "
                f"{len(quantized)} quantized linear layers, {len(plain)} left in full precision "
                f"(e.g. {', '.join((plain or wrong)[:3]) or 'none'}). Check that bitsandbytes is "
                "installed and supports this device, and that the model is not already quantized."
            )
        if method in ("nf4", "fp4"):
            states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
            types = {m.weight.quant_type for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
            if types != {method}:
                raise ModelLoadError(f"quantization.method is {method}, but the weights are {sorted(types)}")
    elif method == "none" and quantized:
        raise ModelLoadError("quantization.method is none, but the model loaded with bitsandbytes layers")

    descriptions = {
        "nf4": "4-bit NF4",
        "fp4": "4-bit FP4",
        "int8": "8-bit LLM.int8",
        "none": f"unquantized {next(model.parameters()).dtype}",
        "gptq": "GPTQ (pre-quantized)",
    }
    description = descriptions[method]
    qc = getattr(model.config, "quantization_config", None)
    if method in ("nf4", "fp4") and qc is not None and getattr(qc, "bnb_4bit_use_double_quant", False):
        description += " + double quant"
    return {
        "method": method,
        "description": description,
        "quantized_layers": len(quantized),
        # A merge onto the NF4 round trip of the base reproduces exactly these layers.
        "quantized_modules": sorted(quantized),
        # As loaded, not as requested: transformers offers no block size setting (always 64 today).
        "blocksize": states[0].blocksize if method in ("nf4", "fp4") else None,
        "footprint_bytes": int(model.get_memory_footprint()),
        "fp16_equivalent_bytes": int(full_precision_params * 2),
    }


def disable_cpu_4bit_repacking(model) -> None:
    """Keep bitsandbytes' 4-bit layers on the exact dequantize-then-matmul path on the CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weights into an
    inference-only layout the first time it runs in eval mode without gradients, and then
    computes in bf16. It does not undo this when training resumes: the next training steps
    go through a kernel without autograd, which silently drops gradients (or fails on
    layers with a bias). Turned off, training is correct, and evaluations and merge checks
    compute exactly what training computed.
    """

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _require_gptq_kernels(device: Device) -> None:
    missing = [p for p in ("gptqmodel", "optimum") if importlib.util.find_spec(p) is None]
    if device.type != "cuda" or missing:
        reasons = []
        if device.type != "cuda":
            reasons.append("no CUDA GPU is available")
        if missing:
            reasons.append(f"missing packages: {', '.join(missing)} (pip install gptqmodel optimum)")
        raise ModelLoadError(
            "quantization.method gptq needs GPTQ kernels on an NVIDIA GPU: "
            + "; ".join(reasons)
            + ". To fine-tune this model on this machine, use an unquantized base with quantization.method nf4."
        )


def _explained(cfg: ModelSection, what: str, error: Exception) -> Exception:
    """A hub, network or not-found failure as a ModelLoadError that says what to check; anything
    else (CUDA out of memory, a bitsandbytes failure, a broken file) as it was raised."""
    if _from_hub(error):
        hint = f"could not load the {what} {cfg.name!r}"
        if cfg.revision:
            hint += f" (revision {cfg.revision})"
        hint += f": {type(error).__name__}: {error}"
        if not cfg.name.startswith(("tiny://", "/", ".")):
            hint += "\nCheck the name, your network, and HF_TOKEN for gated models (e.g. Llama)."
        return ModelLoadError(hint)
    if isinstance(error, ValueError) and "trust_remote_code" in str(error):
        return ModelLoadError(
            f"could not load the {what} {cfg.name!r}: {error}\n"
            "This model ships its own code; if you trust it, set model.trust_remote_code: true."
        )
    return error


# What the hub layer raises: huggingface_hub's errors (HTTP, offline, missing file, bad repo id)
# and httpx2's network errors; transformers re-raises them as OSError from transformers.utils.hub.
_HUB_ERRORS = (HfHubHTTPError, OfflineModeIsEnabled, EntryNotFoundError, HFValidationError, httpx2.HTTPError)
_HUB_MODULES = (f"{os.sep}huggingface_hub{os.sep}", f"{os.sep}transformers{os.sep}utils{os.sep}hub.py")


def _from_hub(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, _HUB_ERRORS):
            return True
        if isinstance(error, OSError) and error.__traceback__ is not None:
            raised_in = traceback.extract_tb(error.__traceback__)[-1].filename
            if any(part in raised_in for part in _HUB_MODULES):
                return True
        error = error.__cause__ or error.__context__
    return False
