"""Peak GPU memory of a recipe per device, predicted from the model's config alone (no weights loaded).

The prediction counts what this stack keeps in memory, tensor by tensor, the way PyTorch's
allocator sees it (torch.cuda.max_memory_allocated), then adds what the allocator does not
count (CUDA context, NCCL buffers, allocator slack) to say whether a card is big enough:

  weights      4-bit packed linear layers + their quantization constants, the 16-bit
               embeddings, output head and norms, the LoRA weights
  training     LoRA gradients and optimizer states (and what the strategy shards of them)
  activations  what autograd saves for the backward pass, per decoder layer: for each LoRA
               layer its dropout output and mask (on the CPU its input, kept once, and a
               one-byte mask: training.model.lora_dropout) and the low-rank product; the attention
               inputs and output; the MLP's gate, up and activation; each norm's fp32 input.
               The 4-bit base layers save nothing (their backward needs only the weights).
               With activation checkpointing only each layer's input is kept, and one layer
               at a time is recomputed in the backward pass. It is off by default where the
               peak without it stays within a share of the device's memory
               (activation_checkpointing_default).
  output head  on GPUs TRL computes the loss in chunks without full logits; its tile buffer
               is min(tokens, 4096) x 32768 in the compute dtype, plus an fp32 input gradient.
               On the CPU: fp32 logits of the scored positions and their gradient (training.train.loss).

The peak is the largest of the moments where these meet: the loss head's backward, the
backward of one (recomputed) layer, the optimizer step, and, with FSDP or ZeRO-3, the
loading of the whole 4-bit model on every GPU before it is sharded. Batches are assumed
full: every row max_length tokens, with padding in the batch (masked attention); packed batches
under SDPA attend per sequence without a mask (training.model.varlen_attention).

Checked against measured peaks on the CPU, and the per-layer activations of the GPU path (16-bit,
peft's dropout) against what autograd saves under bf16 autocast (tests/training/train/test_estimate.py).
On GPUs (BENCHMARKS.md, the 7B bench, whose figures are GB or GiB: it says why the unit is
uncertain) the allocated peak was 4-5% (or 11%) over the estimate with checkpointing and within
1% of it (or 7% over) without, once each layer's SDPA bias is counted. Every run records the
estimate beside its measured peak in run.json, which settles it on the next GPU run.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import AutoConfig

from training.errors import RecipeError
from training.model.lora import AUTO_TARGETS
from training.model.tiny import resolve_model_name
from training.model.varlen_attention import NAME as VARLEN_ATTENTION
from training.recipe import Recipe
from training.train.distributed import ranks, zero_stage
from training.train.hardware import installed, liger_supports
from training.train.sft_config import check_training_keys

GiB = 2**30

# Usable memory per card (GiB): total as torch.cuda.mem_get_info reports it with no process
# running, approximate; --gpu-memory gives any other size.
CARDS = {
    "l4-24gb": 22.0,
    "a10g-24gb": 22.0,
    "rtx3090-24gb": 23.5,
    "rtx4090-24gb": 23.5,
    "a100-40gb": 39.4,
    "l40s-48gb": 44.4,
    "a6000-48gb": 47.5,
    "a100-80gb": 79.1,
    "h100-80gb": 79.1,
    "h200-141gb": 139.8,
}
_UNITS = {"gib": 1.0, "g": 1.0, "gb": 1e9 / GiB, "mib": 1 / 1024, "mb": 1e6 / GiB, "tib": 1024.0}


def parse_capacity(text: str) -> float:
    """'80GiB', '80GB' (10^9 bytes), '81920MiB' or a bare number of GiB -> GiB."""

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = (m.group(2) or "gib").lower() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise RecipeError(f"--gpu-memory {text!r}: give a size such as 80GiB, 24GB (10^9 bytes) or 40960MiB")
    return float(m.group(1)) * _UNITS[unit]


def card_capacity(name: str) -> float:
    key = name.lower()
    if key not in CARDS:
        raise RecipeError(f"--card {name!r}: known cards are {', '.join(CARDS)}; for others use --gpu-memory")
    return CARDS[key]


# TRL's chunked loss head on GPUs (trl/kernels/chunked_logprob.py): a [token chunk, vocab chunk] tile.
HEAD_TOKEN_CHUNK = 4096
HEAD_VOCAB_CHUNK = 32768

# Activation checkpointing is off by default while the estimated peak without it stays under
# this share of the device's memory: recomputing every layer costs about a third of a step, and
# the memory it saves is only worth that where memory is short.
# - cpu: of the machine's physical memory (other processes and the page cache live there too).
# - cuda: of the GPU memory the process can use (free + what it already holds). Without
#   checkpointing the estimate is within 1% of the allocated peaks measured on the 7B bench
#   (61.6 vs 61.4 GB, 71.6 vs 71.7 GB, BENCHMARKS.md "GPU (H200)"; 7% under if those figures,
#   whose raw data was not kept, are GiB), and the allocator reserves up to about a tenth more,
#   so a predicted 75% lands near 83% of the card (88% if 7% under): room left, no out-of-memory
#   error mid-run.
UNCHECKPOINTED_SHARE = {"cpu": 0.25, "cuda": 0.75}

# Outside torch's allocator, approximate: CUDA context with cuBLAS workspaces (0.3-0.6 GiB on
# recent GPUs with lazy module loading), NCCL communicator buffers, and the allocator's
# reserved-but-unused slack as a fraction of the allocated peak.
CUDA_CONTEXT = int(0.5 * GiB)
NCCL_BUFFERS = int(0.25 * GiB)
ALLOCATOR_SLACK = 0.10

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"}
OPTIMIZER_STATE_BYTES = {  # bytes per trainable parameter, None: the parameter's own dtype x 2
    "adamw_torch": None,
    "adamw_torch_fused": None,
    "adamw_torch_4bit": 1.0,
    "paged_adamw_32bit": 8,
    "adamw_bnb_8bit": 2,
    "paged_adamw_8bit": 2,
    "adamw_8bit": 2,
    "paged_adamw": 8,
    "sgd": 0,
    "adafactor": 0.1,
}


@dataclass(frozen=True)
class Linear:
    name: str
    inputs: int
    outputs: int
    group: str  # layers that read the same input tensor


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a model config."""

    family: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    parallel_residual: bool
    linears: tuple[Linear, ...]

    @classmethod
    def from_config(cls, config) -> Shape:
        model_type = config.model_type
        h = config.hidden_size
        heads = config.num_attention_heads
        if model_type in LLAMA_LIKE:
            kv = getattr(config, "num_key_value_heads", None) or heads
            hd = getattr(config, "head_dim", None) or h // heads
            i = config.intermediate_size
            linears = (
                Linear("q_proj", h, heads * hd, "attn_in"),
                Linear("k_proj", h, kv * hd, "attn_in"),
                Linear("v_proj", h, kv * hd, "attn_in"),
                Linear("o_proj", heads * hd, h, "attn_out"),
                Linear("gate_proj", h, i, "mlp_in"),
                Linear("up_proj", h, i, "mlp_in"),
                Linear("down_proj", i, h, "mlp_out"),
            )
            return cls("llama", model_type, h, i, config.num_hidden_layers, heads, kv, hd,
                       config.vocab_size, bool(config.tie_word_embeddings), False, linears)  # fmt: skip
        if model_type == "gpt_neox":
            i = config.intermediate_size
            linears = (
                Linear("query_key_value", h, 3 * h, "attn_in"),
                Linear("dense", h, h, "attn_out"),
                Linear("dense_h_to_4h", h, i, "mlp_in"),
                Linear("dense_4h_to_h", i, h, "mlp_out"),
            )
            return cls("gpt_neox", model_type, h, i, config.num_hidden_layers, heads, heads, h // heads,
                       config.vocab_size, bool(config.tie_word_embeddings),
                       bool(config.use_parallel_residual), linears)  # fmt: skip
        raise RecipeError(
            f"the memory estimator knows Llama-like ({', '.join(sorted(LLAMA_LIKE))}) and GPT-NeoX "
            f"architectures, not {model_type!r}"
        )

    @property
    def linear_params(self) -> int:
        return self.layers * sum(lin.inputs * lin.outputs for lin in self.linears)


def load_config(recipe: Recipe, config_path: str | None = None):
    """The model's config: a config.json given, or the recipe's model (local, tiny://, or the hub)."""

    if config_path:
        path = Path(config_path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RecipeError(f"--config {path}: cannot read a JSON config: {e}") from None
        return AutoConfig.for_model(**raw)
    try:
        return AutoConfig.from_pretrained(
            resolve_model_name(recipe.model.name),
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    except OSError as e:
        raise RecipeError(
            f"could not read the config of {recipe.model.name!r} ({e}). Offline, give the model's "
            "config.json with --config path/to/config.json"
        ) from None


@dataclass(frozen=True)
class Setup:
    """The run's settings that decide its memory, resolved from the recipe and the target device."""

    device: str  # cuda | cpu
    gpus: int
    compute: int  # bytes per element of activations (bf16/fp16: 2, fp32: 4)
    lora_bytes: int
    batch: int
    seq: int
    targets: frozenset[str]
    rank: int
    dropout: bool
    quant: str
    double_quant: bool
    checkpointing: bool
    every_n_layers: int
    offload_checkpoints: bool
    selective: bool
    attention: str
    packing: bool
    liger: bool
    optim: str
    strategy: str
    zero_stage: int | None
    fsdp_offload: bool
    dora: bool

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def mask_bytes(self) -> int:
        # Dropout keeps its mask for the backward: a bool tensor on CUDA, the input's dtype on the CPU.
        if not self.dropout:
            return 0
        return 1 if self.device == "cuda" or self.fused_dropout else self.compute

    @property
    def fused_dropout(self) -> bool:
        # training.model.lora_dropout on the CPU: a one-byte mask per LoRA layer, its input kept once.
        return self.device == "cpu" and self.dropout and not self.dora

    @property
    def distributed(self) -> bool:
        return self.strategy != "none" and self.gpus > 1


def lora_target_names(lora, shape: Shape) -> frozenset[str]:
    """The linear layers of each decoder layer that the recipe's lora section adapts."""
    if lora.target_modules == "auto":
        auto = AUTO_TARGETS.get(shape.model_type)
        if auto is None:
            raise RecipeError(f"lora.target_modules auto knows no targets for {shape.model_type!r}")
        targets = set(auto["attention"] + (auto["mlp"] if lora.include_mlp else []))
    elif lora.target_modules == "all-linear":
        targets = {lin.name for lin in shape.linears}
    else:
        targets = set(lora.target_modules)
    unknown = targets - {lin.name for lin in shape.linears}
    if unknown:
        raise RecipeError(
            f"lora.target_modules {sorted(unknown)}: not linear layers of a {shape.model_type} model"
        )
    return frozenset(targets)


def resolve_setup(
    recipe: Recipe, shape: Shape, *, device: str = "cuda", gpus: int = 1, memory: int | None = None
) -> Setup:
    """The run's settings on `device`: the recipe's, else this stack's defaults there.

    `memory` (bytes) is what one device can hold, for the activation checkpointing default
    (memory_budget: on the CPU this process's share of the machine by default; a GPU run without
    it keeps checkpointing on).
    """

    training = check_training_keys(recipe.training, "<recipe>")  # values typed, old names moved over
    lora = recipe.lora
    targets = lora_target_names(lora, shape)

    # This stack computes in float32 on the CPU, in the recipe's dtype (16-bit unless float32) on GPUs.
    compute = 4 if device == "cpu" or recipe.model.dtype == "float32" else 2
    quantized = recipe.quantization.method != "none"
    # TRL keeps a quantized model's LoRA weights in bf16 on GPUs (this stack: fp32 on the CPU);
    # peft upcasts the adapters of an unquantized 16-bit model to fp32.
    lora_bytes = 2 if device == "cuda" and quantized and compute == 2 else 4
    kwargs = training.get("activation_checkpointing_kwargs") or {}
    checkpointing = bool(training.get("activation_checkpointing", True))
    default_optim = "paged_adamw_32bit" if device == "cuda" else "adamw_torch"
    optim = str(training.get("optim", default_optim))
    if device == "cpu" and optim.startswith("paged_"):
        optim = "adamw_torch"
    strategy = recipe.distributed.strategy if gpus > 1 else "none"
    packing = recipe.data.packing or bool(training.get("padding_free"))
    if strategy in ("fsdp", "deepspeed") and "optim" not in training:
        optim = "adamw_torch"
    setup = Setup(
        device=device,
        gpus=gpus,
        compute=compute,
        lora_bytes=lora_bytes,
        batch=int(training.get("per_device_train_batch_size", 8)),
        seq=recipe.data.max_length,
        targets=targets,
        rank=lora.r,
        dropout=lora.dropout > 0,
        quant=recipe.quantization.method,
        double_quant=recipe.quantization.double_quant,
        checkpointing=checkpointing,
        every_n_layers=int(kwargs.get("every_n_layers", 1)),
        offload_checkpoints=bool(kwargs.get("offload", False)),
        selective=bool(kwargs.get("selective", False)),
        attention=_attention(recipe.model.attn_implementation, packing),
        packing=packing,
        # On GPUs Liger's kernels are the default where they are installed and know the architecture.
        liger=bool(training.get("use_liger_kernel", device == "cuda" and liger_supports(shape.model_type))),
        optim=optim,
        strategy=strategy,
        zero_stage=zero_stage(recipe) if strategy == "deepspeed" else None,
        fsdp_offload=recipe.distributed.fsdp.cpu_offload,
        dora=lora.use_dora,
    )
    if checkpointing_is_default(training, setup.strategy, gpus):
        budget = memory_budget(device, memory)
        if budget:
            unchecked = _estimate("", shape, replace(setup, checkpointing=False)).allocated_peak
            setup = replace(setup, checkpointing=unchecked > UNCHECKPOINTED_SHARE[device] * budget)
    return setup


def memory_budget(device: str, memory: int | None = None) -> int | None:
    """The memory the checkpointing default weighs against: `memory` where given, else on the CPU
    this machine's memory divided among the run's processes on it; on a GPU, unknown (None)."""
    if memory is not None or device != "cpu":
        return memory
    machine = physical_memory()
    return machine // ranks().local_world_size if machine else None


def checkpointing_is_default(training: dict, strategy: str, gpus: int) -> bool:
    """Whether this stack decides activation checkpointing: the recipe leaves it unset and no
    sharding strategy owns it (FSDP wraps it into its own config, and neither FSDP's nor ZeRO's
    memory is measured yet, so both keep it on)."""
    sharded = gpus > 1 and strategy in ("fsdp", "deepspeed")
    return "activation_checkpointing" not in training and not sharded


def activation_checkpointing_default(
    recipe: Recipe, config, *, device: str = "cpu", memory: int | None = None, gpus: int = 1
) -> bool:
    """Whether a run checkpoints activations: as the recipe says, else only where memory needs it.

    Off unless the estimated peak without it exceeds UNCHECKPOINTED_SHARE of `memory` (one
    device's; on the CPU this machine's by default). Architectures the estimator does not know,
    and GPU runs whose memory is not given, keep it on.
    """
    try:
        return resolve_setup(
            recipe, Shape.from_config(config), device=device, gpus=gpus, memory=memory
        ).checkpointing
    except RecipeError:
        return bool(check_training_keys(recipe.training, "<recipe>").get("activation_checkpointing", True))


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""
    # On the card but outside PyTorch's allocator (not in torch.cuda.max_memory_allocated).
    outside_allocator: bool = False


@dataclass
class Estimate:
    model: str
    setup: Setup
    phases: dict[str, list[Term]]
    overhead: list[Term]
    notes: list[str] = field(default_factory=list)
    other_checkpointing: int = 0  # the allocated peak with activation checkpointing switched the other way

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(t.bytes for t in self.phases[p]))

    @property
    def allocated_peak(self) -> int:
        """Comparable to torch.cuda.max_memory_allocated (and, on the CPU, to the live-tensor peak)."""
        return int(sum(t.bytes for t in self.phases[self.peak_phase]))

    @property
    def total(self) -> int:
        return self.allocated_peak + int(sum(t.bytes for t in self.overhead))

    def fits(self, capacity_gib: float) -> bool:
        return self.total <= capacity_gib * GiB

    def as_dict(self, capacity: tuple[str, float] | None = None) -> dict:
        cards = dict([capacity]) if capacity else CARDS
        return {
            "model": self.model,
            "device": self.setup.device,
            "gpus": self.setup.gpus,
            "strategy": self.setup.strategy,
            "peak_phase": self.peak_phase,
            "allocated_peak_bytes": self.allocated_peak,
            "total_bytes": self.total,
            "phases": {p: {t.name: int(t.bytes) for t in terms} for p, terms in self.phases.items()},
            "overhead": {t.name: int(t.bytes) for t in self.overhead},
            "activation_checkpointing": self.setup.checkpointing,
            "allocated_peak_other_checkpointing_bytes": self.other_checkpointing,
            # Per card: usable GiB and whether the total (allocated peak + overhead) fits.
            "fits": {name: {"usable_gib": cap, "fits": self.fits(cap)} for name, cap in cards.items()},
            "notes": self.notes,
        }


def estimate(
    recipe: Recipe, config, *, device: str = "cuda", gpus: int = 1, memory: int | None = None
) -> Estimate:
    """The run's memory on `device`; `memory` (bytes per device) decides the checkpointing default."""
    shape = Shape.from_config(config)
    s = resolve_setup(recipe, shape, device=device, gpus=gpus, memory=memory)
    est = _estimate(recipe.model.name, shape, s)
    flipped = _estimate(recipe.model.name, shape, replace(s, checkpointing=not s.checkpointing))
    est.other_checkpointing = flipped.allocated_peak
    est.notes += _default_notes(recipe, shape, est, memory_budget(device, memory))
    return est


def checkpointing_reason(est: Estimate, budget: int | None) -> str:
    """Why the default turned activation checkpointing on or off for this estimate, against `budget`
    (memory_budget's): the figures the decision compared."""
    s = est.setup
    share = UNCHECKPOINTED_SHARE[s.device]
    unchecked = est.other_checkpointing if s.checkpointing else est.allocated_peak
    where = "this machine's memory" if s.device == "cpu" else "the GPU memory a run can use"
    if not budget:
        return (
            f"counted on (no GPU size given): a run turns it off by default where the peak without it "
            f"({human(unchecked)}) is at most {share:.0%} of {where}, i.e. on GPUs with "
            f"{human(unchecked / share)} or more (--card or --gpu-memory decides it here)"
        )
    state, verdict = ("on", "over") if s.checkpointing else ("off", "within")
    return (
        f"{state} by default: the peak without it ({human(unchecked)}) is {verdict} {share:.0%} of "
        f"{where} ({human(budget)})"
    )


def _default_notes(recipe: Recipe, shape: Shape, est: Estimate, budget: int | None) -> list[str]:
    """How this stack's defaults were decided for this estimate, where the recipe leaves them unset."""
    s, notes = est.setup, []
    training = check_training_keys(recipe.training, "<recipe>")
    if checkpointing_is_default(training, s.strategy, s.gpus):
        notes.append(f"activation checkpointing {checkpointing_reason(est, budget)}")
    liger_missing = "use_liger_kernel" not in training and not installed("liger_kernel")
    if s.device == "cuda" and liger_missing and shape.family == "llama":
        notes.append(
            "Liger's kernels counted off: liger-kernel is not installed here. GPU runs use them by default "
            "where it is (the CUDA image has it); --set training.use_liger_kernel=true counts them"
        )
    return notes


def _estimate(model: str, shape: Shape, s: Setup) -> Estimate:
    weights = _weights(shape, s)
    training = _training_state(shape, s)
    # Paged optimizer states take GPU memory that torch.cuda.max_memory_allocated does not see: they
    # count toward what the card must hold, not toward the allocated peak.
    outside = [t for t in training if t.outside_allocator]
    training = [t for t in training if not t.outside_allocator]
    layer = _layer_saved(shape, s)
    layer_bytes = sum(t.bytes for t in layer)
    kept = _kept_activations(shape, s, layer_bytes)
    head = _head(shape, s)

    phases = {
        "loss head backward": [*weights, *training, *kept, *head],
        "layer backward": [*weights, *training, *kept, *_layer_backward(shape, s, layer_bytes)],
        "optimizer step": [*weights, *training, *_step(shape, s)],
    }
    if s.distributed and (s.strategy == "fsdp" or s.zero_stage == 3):
        phases["loading"] = _weights(shape, s, sharded=False)
    overhead = list(outside)
    if s.device == "cuda":
        overhead.append(Term("CUDA context, cuBLAS workspaces", CUDA_CONTEXT, "approximate"))
        if s.distributed:
            overhead.append(Term("NCCL buffers", NCCL_BUFFERS, "approximate"))
        peak = max(sum(t.bytes for t in terms) for terms in phases.values())
        overhead.append(Term("allocator slack (reserved, unused)", ALLOCATOR_SLACK * peak, "10% of the peak"))
    return Estimate(model, s, phases, overhead, _notes(s))


# ---------------------------------------------------------------------------------------
# The terms


def _lora_params(shape: Shape, s: Setup) -> int:
    per_layer = sum(s.rank * (lin.inputs + lin.outputs) + (lin.outputs if s.dora else 0)
                    for lin in shape.linears if lin.name in s.targets)  # fmt: skip
    return shape.layers * per_layer


def _weights(shape: Shape, s: Setup, *, sharded: bool = True) -> list[Term]:
    n = shape.linear_params
    if s.quant in ("nf4", "fp4", "gptq"):
        packed = n / 2
        # Blocks of 64 weights share one scale: fp32, or 8-bit with fp32 scales of 256 blocks.
        constants = n / 64 * (1 + 4 / 256) if s.double_quant and s.quant != "gptq" else n / 64 * 4
        base = [Term("4-bit linear weights", packed), Term("quantization constants", constants)]
    elif s.quant == "int8":
        base = [Term("8-bit linear weights", n), Term("quantization constants", shape.layers * 4 * sum(
            lin.outputs for lin in shape.linears))]  # fmt: skip
    else:
        base = [Term("16-bit linear weights", n * s.compute)]
    norms = (2 * shape.layers + 1) * shape.hidden * (2 if shape.family == "gpt_neox" else 1)
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    other = Term("embeddings, output head, norms", (embeddings + norms) * s.compute)
    lora = Term("LoRA weights", _lora_params(shape, s) * s.lora_bytes)
    terms = [*base, other, lora]
    if not sharded or not s.distributed:
        return terms
    if s.strategy == "fsdp" or s.zero_stage == 3:
        # Parameters are sharded; bitsandbytes' quantization constants are not parameters and stay whole.
        share = 0 if (s.strategy == "fsdp" and s.fsdp_offload) else 1 / s.gpus
        where = "in CPU memory" if share == 0 else f"1/{s.gpus} each"
        out = [Term(f"{t.name} ({where})", t.bytes * share) if t.name != "quantization constants" else t
               for t in terms]  # fmt: skip
        unit = _largest_unit(shape, s)
        out.append(Term("gathered layers (current + prefetched)", 2 * unit, "unsharded for compute"))
        out.append(Term("gathered output head", shape.vocab * shape.hidden * s.compute, "TRL's loss head"))
        return out
    return terms


def _largest_unit(shape: Shape, s: Setup) -> float:
    per_param = {"nf4": 0.5, "fp4": 0.5, "gptq": 0.5, "int8": 1}.get(s.quant, s.compute)
    layer = sum(lin.inputs * lin.outputs for lin in shape.linears) * per_param
    return layer + _lora_params(shape, s) / shape.layers * s.lora_bytes


def _training_state(shape: Shape, s: Setup) -> list[Term]:
    n = _lora_params(shape, s)
    grads = n * s.lora_bytes
    per_param = OPTIMIZER_STATE_BYTES.get(s.optim, 8)
    states = n * (2 * s.lora_bytes if per_param is None else per_param)
    paged = s.optim.startswith("paged_")
    terms = [
        Term("LoRA gradients", grads),
        Term(
            f"optimizer states ({s.optim})",
            states,
            "CUDA unified memory (bitsandbytes), outside PyTorch's allocator" if paged else "",
            outside_allocator=paged,
        ),
    ]
    if not s.distributed:
        return terms
    g = s.gpus
    if s.strategy == "ddp":
        return [*terms, Term("DDP gradient buckets", grads, "a flat copy of the gradients for all-reduce")]
    if s.strategy == "fsdp":
        share = 0 if s.fsdp_offload else 1 / g
        return [replace(t, bytes=t.bytes * share) for t in terms]
    stage = s.zero_stage or 0
    fp32 = n * 4
    out = [
        Term("LoRA gradients", grads / g if stage >= 2 else grads),
        Term("optimizer states (fp32 Adam)", 2 * fp32 / g if stage >= 1 else 2 * fp32),
        Term("fp32 master weights and gradients", 2 * fp32 / g if stage >= 1 else 2 * fp32),
    ]
    bucket = shape.hidden**2 * s.compute  # reduce_bucket_size "auto" = hidden_size^2 elements
    out.append(Term("DeepSpeed communication buckets", 2 * min(bucket, grads), "overlap_comm double buffer"))
    return out


def _group_inputs(shape: Shape, s: Setup) -> dict[str, int]:
    """Width of each tensor that feeds linear layers."""
    widths = {}
    for lin in shape.linears:
        widths[lin.group] = lin.inputs
    return widths


def _layer_saved(shape: Shape, s: Setup) -> list[Term]:
    """What autograd keeps for one decoder layer's backward pass."""
    T, d, h, i = s.tokens, s.compute, shape.hidden, shape.intermediate
    terms = []
    # Norms keep their input in fp32 (an upcast copy of a 16-bit input); Liger's RMSNorm keeps it as is.
    norm = d if (s.liger and shape.family == "llama") else 4
    norms = 2
    if shape.family == "gpt_neox" and shape.parallel_residual and s.device == "cpu":
        norms = 1  # both LayerNorms read the same fp32 tensor, kept once
    terms.append(Term("norm inputs (fp32)", norms * norm * T * h))

    widths = _group_inputs(shape, s)
    lora_in, kept_inputs = 0.0, 0.0
    for group, width in widths.items():
        members = [lin for lin in shape.linears if lin.group == group]
        targeted = [lin for lin in members if lin.name in s.targets]
        if targeted and s.fused_dropout:
            lora_in += len(targeted) * s.mask_bytes * T * width
            kept_inputs += d * T * width
        elif targeted and s.dropout:
            # Each LoRA layer applies its own dropout: output and mask, per layer.
            lora_in += len(targeted) * (d + s.mask_bytes) * T * width
        elif targeted or s.quant == "int8":
            # Without dropout the LoRA layers (and LLM.int8's backward) keep the shared input itself.
            kept_inputs += d * T * width
    terms.append(Term("LoRA inputs (dropout output and mask)", lora_in))
    if kept_inputs:
        terms.append(Term("layer inputs kept for LoRA / 8-bit backward", kept_inputs))
    terms.append(
        Term(
            "LoRA low-rank products", len([x for x in shape.linears if x.name in s.targets]) * d * T * s.rank
        )
    )

    q = d * T * shape.heads * shape.head_dim
    kv = d * T * shape.kv_heads * shape.head_dim
    masked = s.attention in ("sdpa", "eager")  # padded batches (and packed ones under eager) need a mask
    if masked and shape.kv_heads != shape.heads:
        kv = q  # with a mask, transformers repeats the key/value heads before SDPA
    # GPT-NeoX: rotated q and k are new tensors; v is a view that keeps the fused qkv output alive.
    attention = 2 * q + 3 * d * T * h + q if shape.family == "gpt_neox" else 2 * q + 2 * kv
    lse = 4 * s.batch * shape.heads * s.seq
    terms.append(Term("attention q, k, v, output", attention + lse))
    if s.attention == "sdpa":
        # PyTorch's SDPA turns the boolean mask into an additive bias in the compute dtype on every
        # call (convert_boolean_attn_mask), and its backward keeps that bias: one copy per layer.
        terms.append(Term("attention mask as an SDPA bias", s.compute * _mask_positions(s)))
    if s.attention == "eager":
        terms.append(Term("attention probabilities (eager)", (4 + d) * s.batch * shape.heads * s.seq**2))
    if shape.family == "gpt_neox":
        terms.append(Term("MLP activation input", d * T * i))
    else:
        terms.append(Term("MLP gate, up, activation", (2 if s.liger else 3) * d * T * i))
    return terms


def _attention(implementation: str, packing: bool) -> str:
    """Padding-free batches (packed or not) under SDPA attend per example (training.model.varlen_attention)."""
    return VARLEN_ATTENTION if packing and implementation == "sdpa" else implementation


def _mask_positions(s: Setup) -> int:
    """Entries of the boolean attention mask: a query-by-key square per row, or, packed (padding-free
    batches are one row), one square over the whole batch."""
    return (s.batch * s.seq) ** 2 if s.packing else s.batch * s.seq**2


def _checkpoint_inputs(shape: Shape, s: Setup) -> int:
    return 0 if s.offload_checkpoints else s.compute * s.tokens * shape.hidden


def _kept_activations(shape: Shape, s: Setup, layer_bytes: float) -> list[Term]:
    """Activations alive across the whole backward pass."""
    T, L = s.tokens, shape.layers
    terms = []
    if s.attention in ("sdpa", "eager", VARLEN_ATTENTION):
        # transformers builds the boolean mask once per forward pass; sdpa_varlen does not use it, but
        # activation checkpointing keeps it with each layer's inputs.
        terms.append(
            Term(
                "attention mask",
                _mask_positions(s),
                "packed: one block-diagonal mask over the batch" if s.packing else "",
            )
        )
    if not s.checkpointing:
        terms.append(Term(f"saved activations ({L} layers)", L * layer_bytes))
    else:
        checkpointed = math.ceil(L / s.every_n_layers)
        terms.append(
            Term(f"checkpointed layer inputs ({checkpointed})", checkpointed * _checkpoint_inputs(shape, s))
        )
        if checkpointed < L:
            terms.append(
                Term(
                    f"saved activations ({L - checkpointed} layers not checkpointed)",
                    (L - checkpointed) * layer_bytes,
                )
            )
        if s.selective:
            terms.append(
                Term(
                    "attention outputs kept (selective)",
                    checkpointed * s.compute * T * shape.heads * shape.head_dim,
                )
            )
    terms.append(Term("final norm input (fp32)", 4 * T * shape.hidden))
    return terms


def _head(shape: Shape, s: Setup) -> list[Term]:
    scored = s.batch * (s.seq - 1)  # every position with a label, the worst case
    h, d = shape.hidden, s.compute
    if s.device == "cpu":
        # training.train.loss: fp32 logits of the scored positions, kept for the backward, which
        # makes one gradient of their size (softmax minus the targets).
        return [
            Term("loss head: hidden states of scored tokens", d * scored * h),
            Term("loss head: logits and their gradient (fp32)", 2 * 4 * scored * shape.vocab),
        ]
    chunk = min(scored, HEAD_TOKEN_CHUNK)
    return [
        Term("loss head: hidden states of scored tokens", d * scored * h),
        Term("loss head: tile buffer", chunk * HEAD_VOCAB_CHUNK * d, f"{chunk} x {HEAD_VOCAB_CHUNK}"),
        Term("loss head: input gradient (fp32)", 4 * scored * h + (d * scored * h if d != 4 else 0)),
    ]


def _largest_dequantized(shape: Shape, s: Setup) -> float:
    if s.quant == "none":
        return 0
    return max(lin.inputs * lin.outputs for lin in shape.linears) * s.compute


def _layer_backward(shape: Shape, s: Setup, layer_bytes: float) -> list[Term]:
    T, d = s.tokens, s.compute
    terms = []
    if s.checkpointing:
        terms.append(Term("recomputed layer activations", layer_bytes))
    # The widest transient is the MLP's activation product on its way into down_proj; while the
    # 4-bit down_proj dequantizes its weight for the matmul, down_proj's LoRA input is not yet saved.
    down = next(lin for lin in shape.linears if lin.group == "mlp_out")
    down_saved = 0
    if down.name in s.targets and s.dropout:
        down_saved = (0 if s.fused_dropout else d + s.mask_bytes) * T * down.inputs
    widest = d * T * max(shape.intermediate, shape.hidden)
    widest += max(0.0, _largest_dequantized(shape, s) - down_saved)
    terms += [
        Term("backward temporaries", widest, "widest activation (+ a dequantized 4-bit weight)"),
        Term("gradient of the hidden states", d * T * shape.hidden),
    ]
    return terms


def _step(shape: Shape, s: Setup) -> list[Term]:
    n = _lora_params(shape, s)
    if s.distributed and (s.strategy == "fsdp" or (s.zero_stage or 0) >= 1):
        n /= s.gpus
    return [Term("optimizer step temporaries", n * s.lora_bytes)]


def _notes(s: Setup) -> list[str]:
    notes = []
    if s.distributed and (s.strategy == "fsdp" or s.zero_stage == 3):
        notes.append(
            "loading: bitsandbytes quantizes onto each GPU, so every GPU holds the whole 4-bit model "
            "until it is sharded"
        )
    if s.strategy in ("fsdp", "deepspeed") and s.distributed:
        notes.append(f"{s.strategy}: sharding modelled from the framework's rules; not yet measured on GPUs")
    if s.dora:
        notes.append("DoRA: the per-layer weight norms it computes are not counted (a lower bound)")
    if s.quant == "gptq":
        notes.append("gptq: counted as 4-bit weights with 4-byte group scales")
    return notes


# ---------------------------------------------------------------------------------------
# Presentation


def human(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def format_estimate(est: Estimate, capacity: tuple[str, float] | None = None) -> str:
    s = est.setup
    peak = est.peak_phase
    where = (
        "the CPU" if s.device == "cpu" else (f"{s.gpus} GPUs ({s.strategy})" if s.distributed else "1 GPU")
    )
    lines = [
        f"Memory estimate for {est.model} on {where}: batch {s.batch} x {s.seq} tokens, "
        f"activation checkpointing {'on' if s.checkpointing else 'off'}, {s.quant}, LoRA r {s.rank} on "
        f"{len(s.targets)} layer types, optimizer {s.optim}",
        "",
        f"  {'where the memory goes at the peak (' + peak + ')':<64}{'per device':>14}",
    ]
    for term in est.phases[peak]:
        if term.bytes:
            note = f"  {term.note}" if term.note else ""
            lines.append(f"    {term.name:<62}{human(term.bytes):>12}{note}")
    lines.append(f"  {'allocated peak (torch.cuda.max_memory_allocated)':<64}{human(est.allocated_peak):>14}")
    for term in est.overhead:
        lines.append(f"    {term.name:<62}{human(term.bytes):>12}  {term.note}")
    if s.device == "cuda":
        lines.append(f"  {'total on the card':<64}{human(est.total):>14}")
    others = {p: sum(t.bytes for t in terms) for p, terms in est.phases.items() if p != peak}
    lines.append("  other moments: " + ", ".join(f"{p} {human(b)}" for p, b in others.items()))
    other = "off" if s.checkpointing else "on"
    lines.append(
        f"  with activation checkpointing {other}: allocated peak {human(est.other_checkpointing)} "
        f"(--set training.activation_checkpointing={str(not s.checkpointing).lower()})"
    )
    for note in est.notes:
        lines.append(f"  note: {note}")
    if s.device == "cuda":
        lines.append("")
        cards = [capacity] if capacity else list(CARDS.items())
        for name, cap in cards:
            verdict = "fits" if est.fits(cap) else "does NOT fit"
            lines.append(f"  {name:<14} ({cap:6.1f} GiB usable): {verdict}")
    return "\n".join(lines)
