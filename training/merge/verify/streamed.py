"""The streamed verification: the merged model against base + adapter, one block in memory at a time.

Both models run their own transformers forward over the probe prompts, built empty and given
each decoder layer's weights just before it runs (verify.layerwise):
- the merged model reads the shards that were just written, so what is checked is what was
  published, not what the merge meant to write; both sides read through the safetensors
  library (LibraryReader), not through the merge's own reader and writer;
- the reference is peft's own LoRA/DoRA layers (x W^T + s (x A^T) B^T) around the base
  checkpoint's weights, or their NF4 round trip: the adapter is never folded on this side.
Both compute in float32, so the only difference left is the merged weights' rounding to
the output dtype (CPUs without bf16 instructions also run float32 products 3x faster). The
final logits are compared at every prompt position. The output of the embedding and of each
decoder layer is kept too (a few hundred KB per layer for the probe tokens): when the logits
disagree, the first block whose output already disagrees is named, so a wrong layer is found
without a second run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from peft import PeftConfig, PeftModel, load_peft_weights, set_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoTokenizer

from training.merge.adapters import Adapter
from training.merge.nf4 import RoundTrip
from training.merge.verify.layerwise import BlockWeights, checkpoint_names, empty_model
from training.merge.verify.probes import TOLERANCE, MergeVerificationError, compare, prompt_ids
from training.model.hub_files import weight_files

COMPUTE_DTYPE = torch.float32
_PEFT_PREFIX = "base_model.model."


def verify_streamed(
    base_dir: Path,
    adapter: Adapter,
    merged_dir: Path,
    dtype: torch.dtype,
    round_trip: RoundTrip | None = None,
) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    prompts = prompt_ids(tokenizer)
    reference, reference_blocks = _reference_logits(base_dir, adapter, round_trip, prompts, device)
    merged, merged_blocks = _merged_logits(merged_dir, adapter, prompts, device)
    try:
        return compare(reference, merged, dtype)
    except MergeVerificationError as e:
        raise MergeVerificationError(f"{e}; {_locate(reference_blocks, merged_blocks, dtype)}") from None


def _locate(reference: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    """Where the two runs part: the first block (in the order they ran) whose output differs by more
    than the tolerance, each token's difference measured against that token's own output norm (a
    few tokens with very large activations would otherwise hide every other token)."""
    tolerance = TOLERANCE[dtype]
    for name, want in reference.items():
        got = merged[name]
        per_token = (want - got).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)
        if per_token.max().item() > tolerance:
            return (
                f"the first block whose output differs is {name} "
                f"(relative difference {per_token.max().item():.2e}; the blocks before it agree)"
            )
    return "every decoder layer's output agrees: the difference is in the final norm or the output head"


def _merged_logits(merged_dir: Path, adapter: Adapter, prompts, device) -> tuple[list, dict]:
    files = LibraryReader(merged_dir)
    model = empty_model(merged_dir, COMPUTE_DTYPE, trust_remote_code=adapter.trust_remote_code)
    names = checkpoint_names(model, list(files.tensors))
    return _run(
        model, model, lambda name, out, rows: files.read_into(names[name], out, rows), prompts, device
    )


def _reference_logits(base_dir: Path, adapter: Adapter, round_trip, prompts, device) -> tuple[list, dict]:
    files = LibraryReader(base_dir)
    model = empty_model(base_dir, COMPUTE_DTYPE, trust_remote_code=adapter.trust_remote_code)
    names = checkpoint_names(model, list(files.tensors))

    def base_weight(name: str, out: torch.Tensor, rows: range | None) -> None:
        name = _unwrapped(name)
        if round_trip is not None and round_trip.applies_to(name):
            # Quantization blocks run across rows: round-trip the whole weight, then take the rows.
            weight = round_trip(files.get(names[name]))
            out.copy_(weight if rows is None else weight[rows.start : rows.stop])
        else:
            files.read_into(names[name], out, rows)

    reference = _peft_model(model, adapter, device)
    return _run(reference, model, base_weight, prompts, device)


class LibraryReader:
    """A model directory's tensors read through the safetensors library, not through the merge's
    own reader (weights.Checkpoint) and writer: a mistake those share (an offset, a header
    field) cannot then cancel out between the merged weights and the reference.

    Each read opens the file anew: pages of a mapping that stays open stay resident, so reading
    a whole model through open handles would grow the process to the model's size.
    """

    def __init__(self, model_dir: Path):
        self.tensors: dict[str, Path] = {}
        for file in weight_files(model_dir):  # those transformers loads, as the merge reads
            with safe_open(file, framework="pt") as handle:
                self.tensors.update(dict.fromkeys(handle.keys(), file))

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.tensors[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def read_into(self, name: str, out: torch.Tensor, rows: range | None) -> None:
        with safe_open(self.tensors[name], framework="pt") as handle:
            if rows is None:
                out.copy_(handle.get_tensor(name).view(out.shape))
            else:
                out.copy_(handle.get_slice(name)[rows.start : rows.stop])


def _unwrapped(name: str) -> str:
    """The model's own name of a peft model's parameter (peft adds base_model.model. and .base_layer)."""
    return name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")


def _peft_model(model, adapter: Adapter, device: torch.device) -> PeftModel:
    """peft's model around the empty base, with the adapter's own tensors loaded and resident.

    peft places adapter tensors on their base layer's device, the meta device here, and
    copying into a meta tensor keeps nothing: a first load into the empty model says which
    parameters the adapter file fills (LoRA factors, DoRA magnitudes, trained biases and
    modules), those get memory, and peft's own loading then fills them.
    """
    config = PeftConfig.from_pretrained(adapter.path)
    config.inference_mode = True
    reference = PeftModel(model, config).eval()
    weights = load_peft_weights(str(adapter.path), device="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*meta parameter in the current model.*")
        probe = set_peft_model_state_dict(reference, weights)
    filled = set(reference.state_dict()) - set(probe.missing_keys)
    for name in filled:
        param = reference.get_parameter(name)
        if param.device.type == "meta":
            set_module_tensor_to_device(reference, name, device, value=torch.empty_like(param, device=device))
    set_peft_model_state_dict(reference, weights)
    unfilled = [n for n, p in reference.named_parameters() if p.device.type == "meta" and "lora_" in n]
    if unfilled:
        raise MergeVerificationError(f"{adapter.path}: the adapter file has no tensor for {unfilled[0]}")
    return reference


@torch.no_grad()
def _run(runner, model, source, prompts: list[torch.Tensor], device) -> tuple[list, dict]:
    """Each prompt's logits ([1, tokens, vocab], float32, CPU), and the output ([tokens, hidden])
    of the embedding and of each decoder layer, by module name in the order they ran.

    The prompts run as one packed sequence: position ids that restart at each prompt make
    transformers' mask keep every prompt to itself (no padding to compute).
    """
    runner.requires_grad_(False)
    weights = BlockWeights(source, device)
    weights.attach(runner, model)
    blocks: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(_keep_output(blocks, name)) for name, module in _observed_blocks(model)
    ]
    ids = torch.cat([p[0] for p in prompts]).unsqueeze(0).to(device)
    positions = torch.cat([torch.arange(p.shape[1]) for p in prompts]).unsqueeze(0).to(device)
    try:
        logits = runner(input_ids=ids, position_ids=positions, use_cache=False).logits
    finally:
        weights.detach()
        for handle in handles:
            handle.remove()
    pieces = [piece.float().cpu() for piece in logits.split([p.shape[1] for p in prompts], dim=1)]
    return pieces, blocks


def _observed_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """The input embedding and the decoder layers of `model` (named as in the model, also when
    peft wraps it: peft swaps layers in place, the names of the blocks stay)."""
    layer_classes = set(model._no_split_modules or ())
    embedding = model.get_input_embeddings()
    return [
        (name, module)
        for name, module in model.named_modules()
        if module is embedding or type(module).__name__ in layer_classes
    ]


def _keep_output(blocks: dict[str, torch.Tensor], name: str):
    def keep(_module, _args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        blocks[name] = hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu()

    return keep
