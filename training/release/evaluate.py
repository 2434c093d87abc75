"""Evaluate models of a run side by side: perplexity, greedy answers, lm-evaluation-harness scores.

Variants (any of):
  base            the base model, full precision
  adapter         base + adapter as trained (quantized as in the recipe)
  merged          outputs/<run>/merged
  <path>          any merged model directory (e.g. one merged onto the NF4 round trip)
  http://...      a running OpenAI-compatible server (lm-eval scores only)

Perplexity counts the same tokens training's loss counted (responses only, for
instruction and chat data). Greedy answers to the validation prompts are compared with
the trained model's (base + adapter) and with the reference answers. lm-eval tasks
(training.release.harness) run on the same loaded models.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from matplotlib.figure import Figure
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving import mkl_vml
from training.atomic import replacing, write_json
from training.data.validation import eval_data
from training.errors import UserError
from training.model.loading import compute_dtype, detect_device, load_model
from training.model.scoring import greedy_answers, perplexity
from training.model.tiny import resolve_model_name
from training.recipe import Recipe, ValidationSplit
from training.release.harness import TaskSelection, headline, score_lm, score_model, select_tasks, server_lm
from training.run_dir import MERGE_RECORD, RunDir

log = logging.getLogger(__name__)
SERVER_SCHEMES = ("http://", "https://")
VARIANTS = ("base", "adapter", "merged")  # the run's own models, by name; anything else is a path or a URL


@dataclass
class HarnessSettings:
    """Which lm-eval tasks to run and how (CLI flags over the recipe's eval section)."""

    tasks: list[str] = field(default_factory=list)
    include_paths: list[str] = field(default_factory=list)
    limit: float | None = None
    batch_size: int | str = 1
    concurrency: int = 1
    api_key: str | None = None


def is_server(variant: str) -> bool:
    return variant.startswith(SERVER_SCHEMES)


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


def evaluate(
    recipe: Recipe,
    variants: list[str],
    *,
    file: str | None = None,
    prompts: int = 8,
    harness: HarnessSettings | None = None,
) -> dict:
    mkl_vml.warm_up()
    run = RunDir(recipe.output.run_dir())
    tokenizer_dir = run.adapter if run.adapter.is_dir() else run.merged
    if not (harness and harness.tasks) and any(map(is_server, variants)):
        server = next(filter(is_server, variants))
        raise UserError(f"--model {server}: a server is evaluated with lm-eval tasks only; pass --tasks")
    # Task names and their data are checked before any model loads (minutes for a 7B model).
    selection = select_tasks(harness.tasks, harness.include_paths) if harness and harness.tasks else None
    # Every server is asked first, so one that cannot be scored is refused before a model loads.
    servers = {
        name: server_lm(
            name, tokenizer_dir, selection, api_key=harness.api_key, concurrency=harness.concurrency
        )
        for name in variants
        if is_server(name)
    }
    local = [v for v in variants if not is_server(v)]
    if selection is not None and not local:
        tokenizer, data = None, None  # servers only: lm-eval scores, no perplexity
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        data = _eval_data(recipe, tokenizer, file, prompts, optional=selection is not None)
    results: dict[str, dict] = {}
    for name in variants:
        if is_server(name):
            lm, model_id = servers[name]
            results[f"server {model_id}"] = {"url": name, **score_lm(lm, selection, limit=harness.limit)}
            continue
        label, model = load_variant(name, recipe, run)
        results[label] = _score_local(model, tokenizer, data, selection, harness)
        del model
    if data is not None:
        _compare_answers(results, data.references)
    report = {
        "source": data.source if data else None,
        "rows": len(data.dataset) if data else 0,
        "prompts": len(data.prompts) if data else 0,
        "agreement_reference": next((label for label in results if label.startswith("adapter")), None)
        if data is not None
        else None,
        "models": results,
    }
    if selection is not None:
        report["harness"] = _harness_record(selection, harness)
    return report


def _eval_data(recipe: Recipe, tokenizer, file: str | None, prompts: int, *, optional: bool):
    cfg = recipe.data
    if file is not None:
        cfg = cfg.model_copy(update={"validation": ValidationSplit(file=file)})
    elif cfg.validation is None and optional:
        log.info("The recipe has no validation split: lm-eval scores only, no perplexity or answers")
        return None
    return eval_data(cfg, tokenizer, prompts=prompts)


def _score_local(model, tokenizer, data, selection: TaskSelection | None, harness) -> dict:
    entry: dict = {}
    if data is not None:
        log.info("Perplexity and answers on %d rows of %s", len(data.dataset), data.source)
        entry.update(perplexity(model, data.dataset))
        entry["answers"] = greedy_answers(model, tokenizer, data.prompts, data.tools)
    if selection is not None:
        log.info("lm-eval: %s", ", ".join(selection.names))
        entry.update(
            score_model(model, tokenizer, selection, limit=harness.limit, batch_size=harness.batch_size)
        )
    return entry


def _compare_answers(results: dict[str, dict], references: list[str]) -> None:
    trained = next((r.get("answers") for label, r in results.items() if label.startswith("adapter")), None)
    for r in results.values():
        if not r.get("answers"):  # text-format data has no prompts to answer; servers give none
            continue
        n = len(r["answers"])
        r["exact_match_reference"] = (
            sum(a == b.strip() for a, b in zip(r["answers"], references, strict=True)) / n
        )
        if trained:
            r["agreement_with_trained"] = sum(a == b for a, b in zip(r["answers"], trained, strict=True)) / n


def _harness_record(selection: TaskSelection, harness: HarnessSettings) -> dict:
    return {
        "tasks": selection.names,
        "limit": harness.limit,
        "lm_eval_version": version("lm_eval"),
    }


def write_report(report: dict, json_path: Path, png_path: Path) -> str:
    """A bar chart, then the JSON record, beside the model; returns the terminal table.

    The record goes last, and an earlier one first: a failure in between leaves no record beside a
    chart of other results (or none).
    """
    models = report["models"]
    tasks = report.get("harness", {}).get("tasks", [])
    columns = [_task_column(models, task) for task in tasks]
    json_path.unlink(missing_ok=True)
    _chart(models, columns, png_path, report["source"])
    write_json(json_path, report)
    lines = []
    if report["source"]:
        lines.append(
            f"Evaluation on {report['rows']} rows of {report['source']} ({report['prompts']} prompts for answers)"
        )
    if tasks:
        lines.append(f"lm-eval {report['harness']['lm_eval_version']}: {', '.join(tasks)}")
    header = f"  {'model':<28}{'perplexity':>12}{'tokens':>9}{'agrees w/ trained':>19}{'exact match':>13}"
    lines.append(header + "".join(f"{title:>{max(len(title) + 2, 10)}}" for title, _ in columns))
    for label, r in models.items():
        ppl, agree, exact = (
            r.get("perplexity"),
            r.get("agreement_with_trained"),
            r.get("exact_match_reference"),
        )
        row = (
            f"  {label:<28}{'' if ppl is None else f'{ppl:.3f}':>12}{r.get('tokens', ''):>9}"
            f"{'' if agree is None else f'{agree:.0%}':>19}{'' if exact is None else f'{exact:.0%}':>13}"
        )
        for title, values in columns:
            value = values.get(label)
            row += f"{'' if value is None else f'{value:.3f}':>{max(len(title) + 2, 10)}}"
        lines.append(row)
    lines += [f"  note: {note}" for note in agreement_notes(report)]
    lines.append(f"  -> {json_path}, {png_path}")
    return "\n".join(lines)


def _task_column(models: dict, task: str) -> tuple[str, dict[str, float]]:
    """(column title, {model: value}) for a task's headline metric (accuracy where it has one)."""
    values, metric = {}, None
    for label, r in models.items():
        found = headline(r.get("harness", {}).get(task, {}))
        if found is not None:
            metric, values[label] = found
    return (f"{task} {metric}" if metric else task), values


def _chart(models: dict, columns: list[tuple[str, dict]], path: Path, source: str | None) -> None:
    """Perplexity bars (models that have one) and one bar group per lm-eval task."""
    ppl = {label: r["perplexity"] for label, r in models.items() if r.get("perplexity") is not None}
    panels = (1 if ppl else 0) + (1 if columns else 0)
    fig = Figure(figsize=(max(1.8 * len(models) + 2, 2.4 * len(columns) + 3), 3.5 * max(panels, 1)))
    axes = fig.subplots(max(panels, 1), 1, squeeze=False)[:, 0]
    if ppl:
        ax = axes[0]
        bars = ax.bar(list(ppl), list(ppl.values()), color="#4C72B0")
        ax.bar_label(bars, fmt="%.2f")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(f"Validation perplexity: {source}", fontsize=10)
        ax.set_ylim(0, max(ppl.values()) * 1.15)
    if columns:
        ax = axes[-1]
        labels = list(models)
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(columns))]
            heights = [values.get(label, 0.0) or 0.0 for _, values in columns]
            bars = ax.bar(xs, heights, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(range(len(columns)), [title for title, _ in columns], fontsize=9)
        ax.set_ylabel("score (higher is better)")
        ax.set_ylim(0, 1.15)
        ax.set_title("lm-evaluation-harness", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
