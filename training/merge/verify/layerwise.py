"""Run a transformers causal LM whose weights stay on disk, one block at a time.

The model is built on the meta device with accelerate's `init_empty_weights` (parameters
take no memory; buffers such as the rotary frequencies are computed as usual). Each block
(a decoder layer, a peft-wrapped layer, or a module outside the layers that holds
parameters: embedding, final norm, output head) gets its weights from a forward pre-hook
just before it runs and gives them back in a forward hook right after. The model's own
forward runs unchanged (attention masks, position ids, rotary embeddings, the residual
layout of each architecture), so the logits are what the loaded model computes, with one
block's weights in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

# source(name, out, rows): fill `out` (shaped and typed as the parameter, on the device) with
# the named parameter's values, or with the rows `rows` of its first dimension.
WeightSource = Callable[[str, torch.Tensor, range | None], None]


class LayerwiseUnsupported(Exception):
    """The model cannot be run block by block from its checkpoint's tensors."""


def empty_model(model_dir: Path, dtype: torch.dtype, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model of `model_dir`'s config.json, its parameters on the meta device."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # as from_pretrained does: a tied output head is the embedding's Parameter
    return model.eval()


def checkpoint_names(model: PreTrainedModel, checkpoint_keys: list[str]) -> dict[str, str]:
    """Model parameter name -> checkpoint key, by the renames transformers applies when loading.

    Tied parameters missing from the checkpoint (a tied output head) map to the tensor they
    are tied to. Raises LayerwiseUnsupported where loading converts tensors (fuses or splits
    them) rather than renaming, or where a parameter has no tensor.
    """
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta_state = model.state_dict()
    names: dict[str, str] = {}
    for key in checkpoint_keys:
        renamed, converted = rename_source_key(
            key, renamings, converters, model.base_model_prefix, meta_state
        )
        if renamed not in meta_state and key in meta_state:
            renamed, converted = key, None
        if converted is not None:
            raise LayerwiseUnsupported(f"loading converts {key} ({converted}), not only renames it")
        names[renamed] = key

    # Names that share one Parameter object in the empty model are tied.
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for group in groups.values():
        stored = next((names[n] for n in group if n in names), None)
        for name in group:
            if name not in names:
                if stored is None:
                    raise LayerwiseUnsupported(f"the checkpoint has no tensor for {name}")
                names[name] = stored
    return names


class BlockWeights:
    """Gives each block of an empty model its weights while it runs, and takes them back.

    - A decoder layer (or a peft-wrapped layer, or any other module for the parameters it
      holds itself) gets them in a forward pre-hook and gives them back in a forward hook.
      They are read into one buffer reused from block to block: on the CPU, page faults on
      fresh multi-megabyte allocations cost more than the products of a few probe tokens.
    - The input embedding gets only the rows of the tokens it looks up (the rest of its
      tensor is allocated, never touched, so never resident).
    - A plain linear output head computes the logits a slice of the vocabulary at a time, so
      the vocabulary-sized matrix is never held whole.
    Memory: about one decoder layer in the model's dtype, whatever the vocabulary.
    """

    def __init__(self, source: WeightSource, device: torch.device, head_chunk_bytes: int = 64 << 20):
        self.source = source
        self.device = device
        self.head_chunk_bytes = head_chunk_bytes
        self._arena: torch.Tensor | None = None
        self._undo: list[Callable[[], None]] = []

    def attach(self, runner: nn.Module, model: PreTrainedModel) -> None:
        """Hooks on `runner` (the model, or peft's model around it) for the blocks of `model`."""
        block_classes = set(model._no_split_modules or ())
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        for name, module, recurse in _blocks(runner, block_classes, ""):
            if module is head and type(module) is nn.Linear:
                self._chunk_head(name, module)
                continue
            loaded: list[str] = []
            rows_only = module is embedding and isinstance(module, nn.Embedding)
            pre = module.register_forward_pre_hook(self._loader(name, recurse, loaded, rows_only))
            post = module.register_forward_hook(self._unloader(loaded))
            self._undo += [pre.remove, post.remove]

    def detach(self) -> None:
        for undo in self._undo:
            undo()
        self._undo.clear()
        self._arena = None

    def _buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """`numel` elements of the one reused buffer (grown, never shrunk, while attached)."""
        if self._arena is None or self._arena.numel() < numel or self._arena.dtype != dtype:
            self._arena = None  # freed before the larger one is taken
            self._arena = torch.empty(numel, dtype=dtype, device=self.device)
        return self._arena[:numel]

    def _loader(self, block: str, recurse: bool, loaded: list[str], rows_only: bool):
        def load(module: nn.Module, args) -> None:
            # The others are resident: adapter factors, trained modules.
            wanted = [(n, p) for n, p in module.named_parameters(recurse=recurse) if p.device.type == "meta"]
            if rows_only or len({p.dtype for _, p in wanted}) > 1:
                values = [torch.empty(p.shape, dtype=p.dtype, device=self.device) for _, p in wanted]
            else:
                arena = (
                    self._buffer(sum(p.numel() for _, p in wanted), wanted[0][1].dtype) if wanted else None
                )
                pieces = arena.split([p.numel() for _, p in wanted]) if wanted else []
                values = [piece.view(p.shape) for piece, (_, p) in zip(pieces, wanted, strict=True)]
            tokens = args[0].unique().tolist() if rows_only else []
            for (name, _), value in zip(wanted, values, strict=True):
                full = f"{block}.{name}" if block else name
                if rows_only:
                    for token in tokens:
                        self.source(full, value[token : token + 1], range(token, token + 1))
                else:
                    self.source(full, value, None)
                set_module_tensor_to_device(module, name, self.device, value=value, clear_cache=False)
                loaded.append(name)

        return load

    def _unloader(self, loaded: list[str]):
        def unload(module: nn.Module, _args, _output) -> None:
            for name in loaded:
                set_module_tensor_to_device(module, name, "meta", clear_cache=False)
            loaded.clear()

        return unload

    def _chunk_head(self, name: str, head: nn.Linear) -> None:
        """Replace the head's forward (on the instance, as accelerate's hooks do) by one that
        reads and multiplies a slice of the vocabulary at a time."""
        weight, bias = f"{name}.weight", (f"{name}.bias" if head.bias is not None else None)
        out_features, in_features = head.weight.shape
        dtype = head.weight.dtype
        rows = max(self.head_chunk_bytes // (in_features * head.weight.element_size()), 1)

        def forward(x: torch.Tensor) -> torch.Tensor:
            logits = torch.empty(*x.shape[:-1], out_features, dtype=dtype, device=self.device)
            for start in range(0, out_features, rows):
                part = range(start, min(start + rows, out_features))
                w = self._buffer(len(part) * in_features, dtype).view(len(part), in_features)
                self.source(weight, w, part)
                b = None
                if bias is not None:
                    b = torch.empty(len(part), dtype=dtype, device=self.device)
                    self.source(bias, b, part)
                logits[..., part.start : part.stop] = nn.functional.linear(x, w, b)
            return logits

        head.forward = forward
        self._undo.append(lambda: delattr(head, "forward"))


def _blocks(module: nn.Module, block_classes: set[str], prefix: str) -> Iterator[tuple[str, nn.Module, bool]]:
    """(name, module, whole subtree?) for every unit that gets weights: decoder layers and
    peft-wrapped layers as a whole (their forward reads weights of submodules, e.g. DoRA's
    norm of the base weight), any other module for the parameters it holds itself."""
    if next(module.parameters(recurse=False), None) is not None:
        yield prefix.rstrip("."), module, False
    for name, child in module.named_children():
        if type(child).__name__ in block_classes or isinstance(child, BaseTunerLayer):
            yield f"{prefix}{name}", child, True
        else:
            yield from _blocks(child, block_classes, f"{prefix}{name}.")
