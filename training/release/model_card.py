"""The model card (README.md) published with an adapter or a merged model.

Metadata is written with huggingface_hub's ModelCardData, so the Hub shows the base model,
datasets and library; the text says what was trained on what, how well it did, the prompt
format, and how to serve it with TGI and vLLM.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

# The same images compose.yaml runs (its defaults), so the card and `make serve` agree.
from serving.backends.tgi import IMAGE as TGI_IMAGE
from serving.backends.vllm import IMAGE as VLLM_IMAGE
from training.release.harness import headline


def _on_hub(name: str | None) -> bool:
    """A hub id (org/name), not a local path or a tiny:// model."""
    return bool(name) and "://" not in name and not Path(name).exists() and name.count("/") == 1


def build_card(kind: str, repo_id: str, run: dict, merge: dict | None, evaluation: dict | None) -> ModelCard:
    recipe = run["recipe"]
    base = recipe["model"]["name"]
    source = recipe["data"]["source"]
    quant = recipe["quantization"]
    data = ModelCardData(
        base_model=base if _on_hub(base) else None,
        datasets=[source] if _on_hub(source) else None,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=["qlora", "lora", "qlora-stack", *(["merged"] if kind == "merged" else [])],
    )
    title = f"LoRA adapter for {base}" if kind == "adapter" else f"{base}, fine-tuned with QLoRA (merged)"
    sections = [
        f"# {repo_id.split('/')[-1]}",
        f"{title}, trained with qlora-stack from the recipe below.",
        _training(run, quant),
        _evaluation(merge, evaluation),
        _prompt_format(run),
        _usage(kind, repo_id, base),
        _serving(kind, repo_id, base),
        "## Recipe\n\n```yaml\n" + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True) + "```",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"
    return ModelCard(content)


def _training(run: dict, quant: dict) -> str:
    recipe, data, metrics = run["recipe"], run["data"], run.get("metrics", {})
    lora = recipe["lora"]
    train = data["train"]
    lines = [
        "## Training",
        "",
        f"- **Base model:** `{recipe['model']['name']}`"
        + (f" (revision `{recipe['model']['revision']}`)" if recipe["model"].get("revision") else ""),
        f"- **Method:** LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}"
        + (", rsLoRA" if lora.get("use_rslora") else "")
        + (", DoRA" if lora.get("use_dora") else "")
        + f", on {', '.join(run['model'].get('lora_target_modules', []))}; base weights "
        + (
            f"quantized to {quant['method']}"
            + (" with double quantization" if quant.get("double_quant") else "")
            if quant["method"] not in ("none",)
            else "in full precision"
        ),
        f"- **Data:** `{recipe['data']['source']}` (split `{recipe['data']['split']}`, format "
        f"`{recipe['data']['format']}`, template `{recipe['data']['template']}`): {train['rows']} training rows"
        + (f", {data['eval']['rows']} validation rows" if data.get("eval") else "")
        + f"; {train['rows_skipped_bad']} malformed rows skipped, {train['rows_over_max_length']} truncated at "
        f"{data['max_length']} tokens; loss on {'responses only' if data['completion_only_loss'] else 'all tokens'}",
        f"- **Run:** {metrics.get('global_step')} steps, {metrics.get('epoch')} epochs on {run['device']['name']}; "
        f"train loss {_num(metrics.get('train_loss_first'))} -> {_num(metrics.get('train_loss_last'))}"
        + (
            f", validation loss {_num(metrics.get('eval_loss_start'))} -> {_num(metrics.get('eval_loss'))}"
            if metrics.get("eval_loss") is not None
            else ""
        ),
        f"- **Versions:** transformers {run['versions'].get('transformers')}, peft {run['versions'].get('peft')}, "
        f"trl {run['versions'].get('trl')}, bitsandbytes {run['versions'].get('bitsandbytes')}",
    ]
    return "\n".join(lines)


def _evaluation(merge: dict | None, evaluation: dict | None) -> str:
    lines = []
    if merge is not None:
        choice = merge.get("base_choice")
        lines.append(
            f"Merged onto the **{merge['merge_base']}** base weights in {merge['dtype']}"
            + (
                ": chosen by validation perplexity, "
                + ", ".join(f"{b} {p:.3f}" for b, p in choice["perplexity"].items())
                if choice
                else ""
            )
            + "."
        )
        if merge.get("verification"):
            v = merge["verification"]
            lines.append(
                f"The merge was checked against base + adapter: logits within {v['relative_diff']:.1e} "
                f"of the logit range (tolerance {v['tolerance']:.0e})."
            )
    if evaluation is not None:
        models = evaluation["models"]
        with_ppl = {label: r["perplexity"] for label, r in models.items() if r.get("perplexity") is not None}
        if with_ppl:
            lines.append(f"\nPerplexity on {evaluation['rows']} rows of {evaluation['source']}:\n")
            lines.append("| model | perplexity |\n|---|---|")
            lines += [f"| {label} | {ppl:.3f} |" for label, ppl in with_ppl.items()]
        lines += _harness_table(evaluation)
    return "## Evaluation\n\n" + "\n".join(lines) if lines else ""


def _harness_table(evaluation: dict) -> list[str]:
    """lm-evaluation-harness scores: one row per model, one column per task (its headline metric)."""
    harness = evaluation.get("harness")
    if not harness:
        return []
    tasks, models = harness["tasks"], evaluation["models"]
    lines = [
        f"\nlm-evaluation-harness {harness['lm_eval_version']} (accuracy where a task has one):\n",
        "| model | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for label, r in models.items():
        cells = []
        for task in tasks:
            found = headline(r.get("harness", {}).get(task, {}))
            cells.append("" if found is None else f"{found[0]} {found[1]:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _prompt_format(run: dict) -> str:
    template = run["recipe"]["data"].get("template")
    if not template:
        return ""
    return (
        "## Prompt format\n\n"
        f"Trained with the `{template}` template, saved as the tokenizer's chat template: use "
        "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` or any chat endpoint "
        "(`/v1/chat/completions`) and prompts are formatted exactly as in training."
    )


def _usage(kind: str, repo_id: str, base: str) -> str:
    if kind == "adapter":
        code = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'
        )
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'
        )
    code += (
        '\nmessages = [{"role": "user", "content": "..."}]\n'
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(inputs, max_new_tokens=128)[0]))"
    )
    return f"## Use with transformers\n\n```python\n{code}\n```"


def _serving(kind: str, repo_id: str, base: str) -> str:
    name = repo_id.split("/")[-1]
    if kind == "adapter":
        tgi = (
            f"docker run --gpus all --shm-size 1g -p 127.0.0.1:8080:80 {TGI_IMAGE} \\\n"
            f"  --model-id {base} --lora-adapters {name}={repo_id}"
        )
        vllm = (
            f"docker run --gpus all -p 127.0.0.1:8000:8000 {VLLM_IMAGE} \\\n"
            f"  {base} --enable-lora --lora-modules {name}={repo_id}"
        )
    else:
        tgi = (
            f"docker run --gpus all --shm-size 1g -p 127.0.0.1:8080:80 {TGI_IMAGE} \\\n"
            f"  --model-id {repo_id} --num-shard 1"
        )
        vllm = (
            f"docker run --gpus all -p 127.0.0.1:8000:8000 {VLLM_IMAGE} \\\n"
            f"  {repo_id} --served-model-name {name} --tensor-parallel-size 1"
        )
    curl = (
        "curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'  -d \'{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello"}}], '
        '"max_tokens": 64}\''
    )
    return (
        "## Serve it\n\n"
        f"Text Generation Inference (set `--num-shard` to the number of GPUs):\n\n```bash\n{tgi}\n```\n\n"
        f"vLLM (set `--tensor-parallel-size` to the number of GPUs):\n\n```bash\n{vllm}\n```\n\n"
        f"Then, against either (vLLM on port 8000):\n\n```bash\n{curl}\n```"
    )


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
