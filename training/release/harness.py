"""lm-evaluation-harness (lm-eval) on the run's models, the shipped task, the hub's tasks and servers.

lm-eval scores a model by the log-likelihood it gives each answer (multiple_choice,
loglikelihood tasks) or by what it generates (generate_until tasks). Models that the
evaluation has already loaded (base, base + adapter in 4-bit, merged) are wrapped in lm-eval's
HFLM instead of being loaded again. A server is scored through its OpenAI-compatible
/v1/completions (lm-eval's local-completions), which for log-likelihood tasks must return the
prompt's log-probabilities (echo + logprobs): vLLM does; TGI's OpenAI routes and the project's
local server (transformers serve) do not, and are refused before any request is scored.

Tasks are looked up in eval/tasks (the project's own, offline) and the extra include paths
first; lm-eval's ~14,000 built-in tasks are indexed only when a name is not found there
(indexing them takes 15-25 s on 2 cores). Built-in tasks read their data from the Hugging Face
Hub: without it they fail here, before any model loads, with the task's name.

lm_eval is imported inside the functions: it is the optional extra `eval` (the rest of the
CLI works without it), and importing it takes about 2.5 s on 2 cores.
"""

from __future__ import annotations

import difflib
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from serving.backends.openai import OpenAICompatible
from training.errors import UserError
from training.model.scoring import continuation_logprob

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval" / "tasks"
LOGLIKELIHOOD_TYPES = frozenset({"loglikelihood", "multiple_choice", "loglikelihood_rolling"})
# Bootstrap resamples for the standard errors of metrics that are not means (e.g. kobest's
# macro F1); lm-eval's default of 100,000 takes minutes on a CPU for a few hundred rows.
BOOTSTRAP_ITERS = 1000
HUB_PROBE_TIMEOUT = 5  # seconds: enough for any working connection, short enough to fail fast
# How far lm-eval's log-likelihood may be from the project's own, relative to its size: the
# rounding of the compute dtype, as for the merge check (batched 16-bit runs pad differently).
AGREEMENT = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
INSTALL_HINT = "pip install 'qlora-stack[eval]' (lm-eval 0.4.13)"


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from None
    return lm_eval


@dataclass
class TaskSelection:
    """Resolved task names, the manager that builds them, and what their requests need."""

    names: list[str]
    manager: Any  # lm_eval.tasks.TaskManager
    output_types: dict[str, str] = field(default_factory=dict)  # leaf task -> output_type

    @property
    def needs_loglikelihood(self) -> bool:
        return any(t in LOGLIKELIHOOD_TYPES for t in self.output_types.values())

    def build(self) -> list:
        """Fresh task objects (lm-eval keeps per-run state in them), one entry per requested name."""
        built = []
        for name in self.names:
            loaded = _load_named(self.manager, name)
            group = loaded["groups"].get(name)
            built += [group] if group is not None else list(loaded["tasks"].values())
        return built


def select_tasks(requested: list[str], include_paths: list[str | Path] = ()) -> TaskSelection:
    """Check every task name and load its data once, before any model is loaded."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path}: not a directory of lm-eval task YAML files")
    paths = [TASKS_DIR, *map(Path, include_paths)]
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if not all(manager.match_tasks([name]) for name in requested):
        hub_tasks = [n for n in requested if not manager.match_tasks([n])]
        for name in hub_tasks:  # a misspelling of a task here is not a reason to ask the Hub
            close = difflib.get_close_matches(name, manager.all_tasks, n=1, cutoff=0.85)
            if close:
                raise UserError(f"--tasks {name}: no lm-eval task of that name (did you mean {close[0]}?)")
        _require_hub(hub_tasks)
        log.info("Indexing lm-eval's built-in tasks for %s", ", ".join(hub_tasks))
        manager = TaskManager(include_path=[str(p) for p in paths])
    names: list[str] = []
    for name in requested:
        matched = manager.match_tasks([name])
        if not matched:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise UserError(
                f"--tasks {name}: no lm-eval task, group or tag of that name"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + "; `lm-eval ls tasks` lists them, and the project's own is qlora_stack_mc"
            )
        names += [m for m in matched if m not in names]
    selection = TaskSelection(names=names, manager=manager)
    for name in names:
        loaded = _load_named(manager, name)
        for task_name, task in loaded["tasks"].items():
            selection.output_types[task_name] = task.config.output_type
    return selection


def _load_named(manager, name: str) -> dict:
    try:
        return manager.load([name])
    except (ConnectionError, OSError) as e:
        # datasets: ConnectionError "Couldn't reach 'skt/kobest_v1' on the Hub (OfflineModeIsEnabled)"
        # offline, other OSErrors for unreadable files.
        raise UserError(
            f"lm-eval task {name}: its data could not be loaded: {e}. Tasks whose data is on the Hugging Face "
            "Hub need the Hub, or the data cached by an earlier run with access; the project's own task "
            "qlora_stack_mc runs offline"
        ) from None


def _require_hub(names: list[str]) -> None:
    """Built-in tasks download their data: say so at once instead of after minutes of retries."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    if datasets_config.HF_HUB_OFFLINE:
        return  # offline on purpose: cached data loads; missing data fails as the task loads, without retries
    try:
        urllib.request.urlopen(
            urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_PROBE_TIMEOUT
        ).close()
    except urllib.error.HTTPError:
        return  # the Hub answered
    except (OSError, ValueError) as e:
        raise UserError(
            f"lm-eval tasks {', '.join(names)} read their data from the Hugging Face Hub ({constants.ENDPOINT}), "
            f"which cannot be reached: {getattr(e, 'reason', e)}. Connect, or set HF_HUB_OFFLINE=1 to use data "
            "cached by an earlier run; the project's own task qlora_stack_mc runs offline"
        ) from None


# ---------------------------------------------------------------------------------------
# Scoring


def score_model(
    model, tokenizer, selection: TaskSelection, *, limit: float | None = None, batch_size: int | str = 1
) -> dict:
    """lm-eval on an already-loaded model; its log-likelihood of one answer is checked against ours."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = _run(lm_eval, lm, selection, limit)
    result = {"harness": scores(out)}
    check = agreement_check(model, tokenizer, out)
    if check is not None:
        result["harness_check"] = check
    return result


def score_lm(lm, selection: TaskSelection, *, limit: float | None = None) -> dict:
    """lm-eval's scores of a model it already has (server_lm's, for a server checked earlier)."""
    return {"harness": scores(_run(require_lm_eval(), lm, selection, limit))}


def server_lm(
    url: str,
    tokenizer_dir: Path,
    selection: TaskSelection,
    *,
    api_key: str | None = None,
    concurrency: int = 1,
):
    """(lm-eval's local-completions model for the server at `url`, the served model id)."""
    from lm_eval.api.registry import get_model

    base = url.rstrip("/").removesuffix("/v1")
    listing = _http_json(f"{base}/v1/models", api_key)
    info = OpenAICompatible().from_models(base, listing, forced=True)
    if selection.needs_loglikelihood:
        _require_prompt_logprobs(base, info.model, api_key, selection)
    lm = get_model("local-completions")(
        base_url=f"{base}/v1/completions",
        model=info.model,
        tokenizer=str(tokenizer_dir),
        tokenizer_backend="huggingface",
        # Token ids for log-likelihoods: the server scores exactly the tokens whose context length
        # the harness counted. Generation sends text, which every completions server accepts.
        tokenized_requests=selection.needs_loglikelihood,
        # The tokenizer's own special tokens (Llama's BOS), as HFLM adds them for the local models.
        add_bos_token=True,
        max_length=info.max_total_tokens or 2048,
        num_concurrent=concurrency,
        header={"Authorization": f"Bearer {api_key}"} if api_key else {},
    )
    return lm, info.model


def _run(lm_eval, lm, selection: TaskSelection, limit: float | None) -> dict:
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=selection.build(),
        task_manager=selection.manager,
        limit=limit,
        log_samples=True,
        bootstrap_iters=BOOTSTRAP_ITERS,
    )


def scores(out: dict) -> dict:
    """{task or group: {metric: value, ..., samples: n}} from simple_evaluate's results."""
    table = {}
    for name, row in out["results"].items():
        metrics = {}
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len
            label = metric if filt == "none" else f"{metric} ({filt})"
            metrics[label] = None if value == "N/A" else float(value)
        samples = out.get("n-samples", {}).get(name, {}).get("effective")
        table[name] = {**metrics, **({"samples": samples} if samples is not None else {})}
    return table


def headline(task_scores: dict) -> tuple[str, float] | None:
    """The metric a table shows for a task: accuracy where there is one, else the first."""
    metrics = [k for k in task_scores if not k.endswith("_stderr") and "_stderr " not in k and k != "samples"]
    if not metrics:
        return None
    key = "acc" if "acc" in metrics else metrics[0]
    return key, task_scores[key]


def agreement_check(model, tokenizer, out: dict) -> dict | None:
    """The harness's log-likelihood of the first choice it scored, recomputed by the project.

    A harness that tokenizes differently from training (a BOS left out, another tokenizer) or
    scores another model than the one loaded would still produce plausible accuracies; this
    catches it.
    """
    for task, samples in out.get("samples", {}).items():
        if out["configs"][task]["output_type"] not in ("multiple_choice", "loglikelihood") or not samples:
            continue
        sample = samples[0]
        context, continuation = sample["arguments"][0][:2]
        theirs = float(sample["resps"][0][0][0])
        ours = continuation_logprob(model, tokenizer, context, continuation)
        tolerance = AGREEMENT.get(model.dtype, AGREEMENT[torch.bfloat16])
        relative = abs(theirs - ours) / max(1.0, abs(ours))
        check = {
            "task": task,
            "doc_id": sample["doc_id"],
            "continuation": continuation,
            "lm_eval": theirs,
            "ours": ours,
            "relative_diff": relative,
            "tolerance": tolerance,
        }
        if relative > tolerance:
            raise HarnessMismatch(
                f"lm-eval's log-likelihood of {continuation!r} in {task} doc {sample['doc_id']} is {theirs:.6f}, "
                f"the model's own is {ours:.6f} ({relative:.1e} apart, tolerance {tolerance:.0e}): "
                "the harness did not score the model as loaded"
            )
        return check
    return None


class HarnessMismatch(RuntimeError):
    """lm-eval computed something else than the loaded model does: a bug, not a user mistake."""


def _require_prompt_logprobs(base: str, model: str, api_key: str | None, selection: TaskSelection) -> None:
    """One log-likelihood request: a server that cannot answer it is refused with the reason."""
    tasks = ", ".join(t for t, kind in selection.output_types.items() if kind in LOGLIKELIHOOD_TYPES)
    body = {"model": model, "prompt": "a b", "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    why = None
    try:
        answer = _http_json(f"{base}/v1/completions", api_key, body)
        logprobs = (answer.get("choices") or [{}])[0].get("logprobs") or {}
        if not isinstance(logprobs.get("token_logprobs"), list) or len(logprobs["token_logprobs"]) < 2:
            why = f"its answer has no prompt log-probabilities: {json.dumps(answer)[:300]}"
    except UserError as e:
        why = str(e)
    if why:
        raise UserError(
            f"{tasks} score answers by their log-likelihood, which lm-eval reads from /v1/completions with "
            f"echo and logprobs; the server at {base} cannot give them ({why}). vLLM can (SERVE_BACKEND=vllm); "
            "TGI and the local server cannot, and serve generation tasks (generate_until) only. Or evaluate "
            "the model directory itself: --model merged"
        )


def _http_json(url: str, api_key: str | None, body: dict | None = None, timeout: float = 60) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:300]
        hint = "; set API_KEY to the server's key" if e.code == 401 else ""
        raise UserError(f"{url} answered {e.code}: {detail}{hint}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"no OpenAI-compatible server answers at {url}: {getattr(e, 'reason', e)}") from None
