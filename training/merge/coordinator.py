"""Merge a LoRA adapter into its base model: a standalone safetensors model that TGI, vLLM and
transformers load, written atomically and verified against base + adapter.

outputs/<run>/merged/
  config.json                        dtype and rope written for transformers 4 and 5
  model(-0000i-of-0000n).safetensors bounded shards (+ model.safetensors.index.json)
  tokenizer.json, tokenizer_config.json (with chat_template), chat_template.jinja
  generation_config.json
  merge.json                         base, strategy, timings, peak memory, verification, serving check

The merge base (merge.base): `original` folds the adapter into the checkpoint's weights;
`nf4-roundtrip` into their NF4 round trip, the weights the 4-bit layers computed with
while the adapter was trained; `auto` builds both and keeps the one with the lower
perplexity on the recipe's validation split, recording both.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving import mkl_vml
from serving.backends.tgi_checks import check_serving
from training.atomic import move_into_place, remove_stale_partials, temp_dir_beside, write_json
from training.errors import UserError
from training.merge.adapters import Adapter, read_adapter
from training.merge.config_files import (
    base_dtype,
    dtype_name,
    write_config,
    write_generation_config,
    write_tokenizer,
)
from training.merge.nf4 import RoundTrip, round_trip_of_run
from training.merge.strategies import open_merged
from training.merge.strategies.streaming import StreamingUnsupported
from training.merge.verify import MODES as VERIFY_MODES
from training.merge.verify import MergeVerificationError, verify_merge
from training.merge.weights import write_weights
from training.model.hub_files import download_model_files
from training.model.scoring import perplexity
from training.model.tiny import resolve_model_name
from training.recipe import Recipe, shard_size_bytes
from training.run_dir import MERGE_RECORD, RunDir
from training.run_lock import one_command_at_a_time
from training.runinfo import human_size, now, peak_memory_bytes, versions
from training.storage import writing_into

log = logging.getLogger(__name__)

BASES = ("original", "nf4-roundtrip")


@dataclass
class MergeSettings:
    base: str = "original"  # original | nf4-roundtrip | auto
    dtype: str = "auto"  # auto: the base model's own dtype
    max_shard_size: str = "2GB"
    verify: str | bool = "streamed"  # streamed | full | off (True: streamed, False: off)
    strategy: str = "auto"  # auto | streaming | peft
    num_shard: int = 1  # GPUs TGI will shard over, for the serving check

    def __post_init__(self) -> None:
        if isinstance(self.verify, bool):
            self.verify = "streamed" if self.verify else "off"
        if self.verify not in VERIFY_MODES:
            raise UserError(f"merge verify {self.verify!r}: allowed are {', '.join(VERIFY_MODES)}")


def resolve_base_dir(adapter: Adapter) -> Path:
    """The base model's files on disk: a local directory, or from its hub snapshot exactly the files
    transformers loads (config, and the index's shards or model.safetensors)."""
    name = resolve_model_name(adapter.base_name)
    if Path(name).is_dir():
        return Path(name)
    try:
        return download_model_files(name, adapter.base_revision)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise UserError(
            f"could not get the base model {name!r} to merge into: {type(e).__name__}: {e}\n"
            "It is read from the Hugging Face cache (HF_HOME) or downloaded; check the name, the "
            "network and HF_TOKEN, or point the adapter's run.json recipe at a local directory."
        ) from None


def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, settings: MergeSettings, *, force: bool = False
) -> dict:
    mkl_vml.warm_up()
    # A folder that is no adapter is refused before any lock file is made.
    base_name = read_adapter(adapter_dir).base_name
    out_dir = Path(out_dir)
    # Before an unfinished merged/ is removed as a killed merge's: another merge may be writing it.
    # The adapter's run too, when it is another (--adapter): a train --force of it deleted the adapter
    # being read, and its training rotated away a checkpoint being read. And the run whose merged
    # model is the base (continued fine-tuning of a merge): its merge --force replaces the base.
    adapter_run = RunDir.of_adapter(adapter_dir)
    base_run = RunDir.of_base_model(base_name)
    reads = [r for r in (adapter_run, base_run) if r is not None]
    with one_command_at_a_time(RunDir.of_merged(out_dir), "merge", reads=reads):
        adapter = read_adapter(adapter_dir)  # again, as it is now that no train can replace it
        return _merge(adapter, out_dir, settings, force=force)


def _merge(adapter: Adapter, out_dir: Path, settings: MergeSettings, *, force: bool) -> dict:
    remove_stale_partials(out_dir.parent, out_dir.name)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists; pass --force (make merge FORCE=1) to replace it")

    base_dir = resolve_base_dir(adapter)
    base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if base_config.get("quantization_config"):
        method = base_config["quantization_config"].get("quant_method", "quantized")
        raise UserError(
            f"the base model {adapter.base_name} is {method}-quantized; a merge needs full-precision base "
            "weights. Serve the adapter on the quantized base instead (TGI multi-LoRA), or fine-tune an "
            "unquantized base with quantization.method nf4."
        )
    dtype = base_dtype(base_dir) if settings.dtype == "auto" else getattr(torch, settings.dtype)
    bases = BASES if settings.base == "auto" else (settings.base,)
    round_trips = {"original": None}
    if "nf4-roundtrip" in bases:
        round_trips["nf4-roundtrip"] = round_trip_of_run(adapter.run, str(adapter.path))

    folders: dict[str, Path] = {}  # one temporary directory per candidate base, beside out_dir
    records: dict[str, dict] = {}
    # The config, the tokenizer (tokenizers' own error) and generation_config.json named no file when
    # the disk filled while they were written, and ended in a traceback; the weights name theirs.
    try:
        with writing_into(out_dir):
            for base in bases:
                folders[base] = temp_dir_beside(out_dir)
                records[base] = _build(
                    folders[base], adapter, base_dir, dtype, settings, base, round_trips[base]
                )
            chosen = _choose_base(folders, records, adapter) if settings.base == "auto" else settings.base
            record = records[chosen]
            serving = check_serving(folders[chosen], settings.num_shard)
            serving.model_dir = str(out_dir)
            record["serving_check"] = serving.as_dict()
            write_json(folders[chosen] / MERGE_RECORD, record)
            move_into_place(folders[chosen], out_dir, replace=force)
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)

    _log_summary(record, serving.format(), out_dir)
    return record


def _build(
    tmp: Path,
    adapter: Adapter,
    base_dir: Path,
    dtype: torch.dtype,
    settings: MergeSettings,
    base: str,
    round_trip: RoundTrip | None,
) -> dict:
    """Write one merged model into `tmp`; return its merge record."""
    strategy, reason = _choose_strategy(adapter, settings.strategy)
    log.info(
        "Merging %s into %s (%s weights, %s) -> %s",
        adapter.path,
        adapter.base_name,
        base,
        dtype_name(dtype),
        strategy,
    )
    started = time.perf_counter()
    config = write_config(tmp, base_dir, dtype)
    tied = bool(config.get("tie_word_embeddings"))
    shard_bytes = shard_size_bytes(settings.max_shard_size)
    try:
        source = open_merged(strategy, base_dir, adapter, dtype, tied=tied, round_trip=round_trip)
        weights = write_weights(tmp, source.specs(), source.get, shard_bytes)
    except StreamingUnsupported as e:
        if settings.strategy == "streaming":
            raise UserError(
                f"the streaming merge cannot fold this adapter: {e}; use --strategy peft"
            ) from None
        strategy, reason = "peft", f"the streaming path does not handle {e}"
        log.warning("Falling back to peft's merge_and_unload: %s", reason)
        source = open_merged(strategy, base_dir, adapter, dtype, tied=tied, round_trip=round_trip)
        weights = write_weights(tmp, source.specs(), source.get, shard_bytes)
    del source
    merge_seconds = time.perf_counter() - started
    merge_peak = peak_memory_bytes()
    write_tokenizer(tmp, adapter.path)
    write_generation_config(tmp, base_dir, config)

    verification = None
    if settings.verify != "off":
        try:
            verification = verify_merge(settings.verify, base_dir, adapter, tmp, dtype, round_trip)
            verification["peak_memory"] = peak_memory_bytes()  # the process's, the merge included
        except MergeVerificationError as e:
            raise UserError(
                f"merge of {adapter.path} failed verification, nothing was written: {e}"
            ) from None
        verification["compared_with"] = reference_model(base, dtype_name(dtype))
    return {
        "adapter": str(adapter.path),
        "base_model": adapter.base_name,
        "base_revision": adapter.base_revision,
        "merge_base": base,
        "dtype": dtype_name(dtype),
        "strategy": strategy,
        "strategy_reason": reason,
        "settings": asdict(settings),
        "weights": weights,
        "merge_seconds": round(merge_seconds, 2),
        "peak_memory_merge": merge_peak,
        "verification": verification,
        "recipe": adapter.run.get("recipe"),
        "versions": versions(),
        "created_at": now(),
    }


def _choose_base(folders: dict[str, Path], records: dict[str, dict], adapter: Adapter) -> str:
    """merge.base auto: the candidate with the lower perplexity on the validation split."""
    # Imported here: the validation data brings datasets, pyarrow and pandas, 82 MB of resident
    # memory (measured 2026-11-29) that every other merge would carry; only this choice reads data.
    from training.data.validation import eval_data

    recipe = Recipe.model_validate(adapter.run["recipe"])
    tokenizer = AutoTokenizer.from_pretrained(adapter.path)
    data = eval_data(recipe.data, tokenizer)
    measured = {}
    for base, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=base_dtype(folder)).eval()
        measured[base] = perplexity(model, data.dataset)["perplexity"]
        del model
    chosen = min(measured, key=measured.get)
    choice = {"mode": "auto", "validation": data.source, "perplexity": measured, "chosen": chosen}
    records[chosen]["base_choice"] = choice
    log.info(
        "merge.base auto: validation perplexity %s -> %s",
        ", ".join(f"{b} {p:.4f}" for b, p in measured.items()),
        chosen,
    )
    return chosen


def _choose_strategy(adapter: Adapter, requested: str) -> tuple[str, str]:
    blockers = adapter.streaming_blockers()
    if requested == "peft":
        return "peft", "requested"
    if blockers:
        if requested == "streaming":
            raise UserError(
                f"the streaming merge cannot fold this adapter ({'; '.join(blockers)}); use --strategy peft"
            )
        log.warning(
            "Using peft's merge_and_unload (whole model in memory): the adapter has %s", "; ".join(blockers)
        )
        return "peft", f"the adapter has {'; '.join(blockers)}"
    return "streaming", "default: one tensor at a time"


def reference_model(merge_base: str, dtype: str) -> str:
    """What verification compares the merged model with: base + adapter, on the merge's own base."""
    if merge_base == "nf4-roundtrip":
        return "the 4-bit base + adapter, as trained"
    return f"the original base in {dtype} + adapter (not the 4-bit model training ran)"


def _log_summary(record: dict, serving: str, out_dir: Path) -> None:
    v = record["verification"]
    if v:
        tokens = (
            f"greedy tokens {'identical' if v['greedy_identical'] else 'differ'}"
            if "greedy_identical" in v
            else f"next tokens {'identical' if v['next_tokens_identical'] else 'differ'}"
        )
        check = (
            f"against {v['compared_with']}: logits within {v['relative_diff']:.1e} "
            f"(tolerance {v['tolerance']:.0e}), {tokens} on {v['prompts']} prompts ({v['mode']}, {v['seconds']} s)"
        )
    else:
        check = "skipped (--verify off)"
    choice = record.get("base_choice")
    base = record["merge_base"]
    if choice:
        base += " (auto: " + ", ".join(f"{b} ppl {p:.3f}" for b, p in choice["perplexity"].items()) + ")"
    lines = [
        f"Merged model written to {out_dir}",
        f"  base         {base}",
        f"  strategy     {record['strategy']} ({record['strategy_reason']})",
        f"  weights      {len(record['weights']['shards'])} shard(s), {human_size(record['weights']['total_bytes'])}, "
        f"{record['dtype']}",
        f"  time         {record['merge_seconds']} s, peak memory {human_size(record['peak_memory_merge']['process_rss'])}",
        f"  verified     {check}",
        serving,
    ]
    log.info("\n".join(lines))
