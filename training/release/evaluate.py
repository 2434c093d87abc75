"""Evaluate models of a run side by side: perplexity on the validation split, greedy answers.

Variants (any of):
  base            the base model, full precision
  adapter         base + adapter as trained (quantized as in the recipe)
  merged          outputs/<run>/merged
  <path>          any merged model directory (e.g. one merged onto the NF4 round trip)

Perplexity counts the same tokens training's loss counted (responses only, for
instruction and chat data). Greedy answers to the validation prompts are compared with
the trained model's (base + adapter) and with the reference answers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from matplotlib.figure import Figure
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.atomic import write_json
from training.data.validation import eval_data
from training.errors import UserError
from training.model.loading import compute_dtype, detect_device, load_model
from training.model.scoring import greedy_answers, perplexity
from training.model.tiny import resolve_model_name
from training.recipe import Recipe, ValidationSplit
from training.run_dir import MERGE_RECORD, RunDir

log = logging.getLogger(__name__)


def load_variant(name: str, recipe: Recipe, run: RunDir):
    """(label, model) for a variant name or a model directory."""
    device = detect_device()
    dtype = compute_dtype(recipe.model.dtype, device)
    placement = {"device_map": {"": 0}} if device.type == "cuda" else {}
    if name == "base":
        base = resolve_model_name(recipe.model.name)
        model = AutoModelForCausalLM.from_pretrained(
            base,
            revision=recipe.model.revision,
            dtype=dtype,
            trust_remote_code=recipe.model.trust_remote_code,
            **placement,
        )
        return "base", model.eval()
    if name == "adapter":
        adapter = run.adapter
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{adapter}: no adapter to evaluate; train first")
        model, _ = load_model(recipe.model, recipe.quantization, device, dtype)
        label = (
            "adapter" if recipe.quantization.method == "none" else f"adapter ({recipe.quantization.method})"
        )
        return label, PeftModel.from_pretrained(model, adapter).eval()
    path = run.merged if name == "merged" else Path(name)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no model to evaluate (expected a merged model directory)")
    merge_info = path / MERGE_RECORD
    base = json.loads(merge_info.read_text()).get("merge_base", "original") if merge_info.is_file() else None
    label = f"merged ({base})" if base else path.name
    return label, AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement).eval()


def agreement_notes(report: dict) -> list[str]:
    """What the agreement column compares, so that it does not seem to contradict the merge's check.

    The merge verifies a model merged onto the original weights against the original base +
    adapter in full precision; the trained model here runs on the 4-bit base, whose rounding of
    the base weights alone can change greedy answers.
    """
    reference = report.get("agreement_reference")
    if reference is None:
        return []
    notes = [f"agrees w/ trained: greedy answers identical to those of '{reference}', the model as trained"]
    quantized = reference != "adapter"
    for label in report["models"]:
        if label == "merged (original)" and quantized:
            notes.append(
                f"'{label}' holds the adapter folded into the original full-precision weights: make merge "
                "verified it against that base + adapter, not against the 4-bit base training used, so "
                f"its answers can differ from '{reference}' (merge.base: nf4-roundtrip reproduces the "
                "4-bit model; README: Merging)"
            )
    return notes


def evaluate(recipe: Recipe, variants: list[str], *, file: str | None = None, prompts: int = 8) -> dict:
    run = RunDir(recipe.output.run_dir())
    tokenizer = AutoTokenizer.from_pretrained(run.adapter if run.adapter.is_dir() else run.merged)
    cfg = recipe.data
    if file is not None:
        cfg = cfg.model_copy(update={"validation": ValidationSplit(file=file)})
    data = eval_data(cfg, tokenizer, prompts=prompts)
    results: dict[str, dict] = {}
    for name in variants:
        label, model = load_variant(name, recipe, run)
        log.info("Evaluating %s on %d rows of %s", label, len(data.dataset), data.source)
        results[label] = {
            **perplexity(model, data.dataset),
            "answers": greedy_answers(model, tokenizer, data.prompts),
        }
        del model
    trained = next((r["answers"] for label, r in results.items() if label.startswith("adapter")), None)
    for r in results.values():
        if not r["answers"]:  # text-format data has no prompts to answer
            continue
        n = len(r["answers"])
        r["exact_match_reference"] = (
            sum(a == b.strip() for a, b in zip(r["answers"], data.references, strict=True)) / n
        )
        if trained is not None:
            r["agreement_with_trained"] = sum(a == b for a, b in zip(r["answers"], trained, strict=True)) / n
    return {
        "source": data.source,
        "rows": len(data.dataset),
        "prompts": len(data.prompts),
        "agreement_reference": next((label for label in results if label.startswith("adapter")), None),
        "models": results,
    }


def write_report(report: dict, json_path: Path, png_path: Path) -> str:
    """JSON and a bar chart beside the model; returns the terminal table."""
    write_json(json_path, report)
    models = report["models"]
    lines = [
        f"Evaluation on {report['rows']} rows of {report['source']} ({report['prompts']} prompts for answers)",
        f"  {'model':<28}{'perplexity':>12}{'tokens':>9}{'agrees w/ trained':>19}{'exact match':>13}",
    ]
    for label, r in models.items():
        agree, exact = r.get("agreement_with_trained"), r.get("exact_match_reference")
        lines.append(
            f"  {label:<28}{r['perplexity']:>12.3f}{r['tokens']:>9}"
            f"{'' if agree is None else f'{agree:.0%}':>19}{'' if exact is None else f'{exact:.0%}':>13}"
        )
    lines += [f"  note: {note}" for note in agreement_notes(report)]
    _bar_chart(models, png_path, report["source"])
    lines.append(f"  -> {json_path}, {png_path}")
    return "\n".join(lines)


def _bar_chart(models: dict, path: Path, source: str) -> None:
    labels = list(models)
    values = [models[label]["perplexity"] for label in labels]
    fig = Figure(figsize=(1.8 * len(labels) + 2, 3.5))
    ax = fig.subplots()
    bars = ax.bar(labels, values, color="#4C72B0")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"Validation perplexity: {source}", fontsize=10)
    ax.set_ylim(0, max(values) * 1.15)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
