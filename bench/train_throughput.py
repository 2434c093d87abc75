"""Training throughput: a recipe run against the plain QLoRA recipe users copy from tutorials.

The tutorial recipe: the same 4-bit model and LoRA, `prepare_model_for_kbit_training`,
text rendered with the same template, `transformers.Trainer` with
`DataCollatorForLanguageModeling(mlm=False)` (pads each batch, loss on every token, no
packing). Against it: the recipe as shipped, and the recipe with packing. Same model, data,
batch size and number of steps; each run in a fresh process, runs interleaved
(A B C A B C ...) so machine noise hits every variant alike. Reported: data tokens
(padding excluded) per second of training after its first step (which also pays for
kernel selection and compilation), peak memory (process RSS; peak CUDA memory allocated
on a GPU), ratios to the tutorial recipe, and on a GPU the model FLOPs utilisation (MFU).

    python bench/train_throughput.py                               # quickstart recipe, CPU
    python bench/train_throughput.py --recipe recipes/x.yaml --steps 30 --repeats 3
    python bench/train_throughput.py --recipe bench/recipes/gpu-7b-varlen.yaml --steps 8 --repeats 1 \
        --variants tutorial,recipe,recipe+packing,recipe+liger,recipe+packing+liger

MFU counts model FLOPs the way PaLM's appendix does, 6 N + 12 L h s per token (N: the
parameters of every matmul including the output head; L layers, h hidden size, s the mean
sequence length), over the GPU's dense bf16 peak. LoRA computes no gradients for the
frozen weights, so the GPU really does about 4 N + recomputation per token; the 6 N
convention keeps the figure comparable with full fine-tuning reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Recipe overrides per variant; "tutorial" is the plain Trainer recipe built below.
VARIANTS = {
    "tutorial": [],
    "recipe": [],
    # TRL packs best-fit-decreasing into padding-free batches (one row of concatenated
    # sequences, position ids restarting per sequence): packing is the padding-free option.
    "recipe+packing": ["data.packing=true"],
    "recipe+liger": ["training.use_liger_kernel=true"],
    "recipe+packing+liger": ["data.packing=true", "training.use_liger_kernel=true"],
    "recipe-checkpointing": ["training.activation_checkpointing=false"],
    "recipe+packing-checkpointing": ["data.packing=true", "training.activation_checkpointing=false"],
    "recipe+packing+liger-checkpointing": [
        "data.packing=true",
        "training.use_liger_kernel=true",
        "training.activation_checkpointing=false",
    ],
    "recipe+compile": ["training.torch_compile=true"],
}
DEFAULT_VARIANTS = "tutorial,recipe,recipe+packing"
# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets, in TFLOP/s.
GPU_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "L4": 121.0}


def common_overrides(steps: int) -> list[str]:
    return [
        f"training.max_steps={steps}",
        "training.save_steps=100000",
        "data.validation=null",
        "training.logging_steps=100000",
    ]


def run_recipe(recipe_path: str, steps: int, out_dir: str, variant: str) -> dict:
    from training.recipe import load_recipe
    from training.train.run import run_training

    overrides = [*common_overrides(steps), f"output.dir={out_dir}", *VARIANTS[variant]]
    recipe = load_recipe(recipe_path, overrides)
    assert run_training(recipe, recipe_path) == 0
    metrics = json.loads((recipe.output.run_dir() / "run.json").read_text())["metrics"]
    return {
        "tokens": metrics["tokens_trained"],
        "seconds": metrics["train_seconds"],
        "steady_tokens_per_second": metrics["steady_tokens_per_second"],
        # Tensor memory during training alone (what `python -m training estimate` predicts).
        "peak_train_bytes": metrics.get("peak_memory_bytes"),
    }


def flops_per_token(config, seq_len: float) -> float | None:
    """Model FLOPs per trained token: 6 N (forward and backward of every matmul) + 12 L h s (attention)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    if config.model_type in ("llama", "mistral", "qwen2", "qwen3"):
        attention = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q, o; k, v
        mlp = 3 * h * inter  # gate, up, down
    elif config.model_type == "gpt_neox":
        attention = 4 * h * h  # query_key_value (3 h^2) and dense (h^2)
        mlp = 2 * h * inter
    else:
        return None
    matmul_params = layers * (attention + mlp) + h * config.vocab_size  # + the output head
    return 6 * matmul_params + 12 * layers * h * seq_len


def run_tutorial(recipe_path: str, steps: int, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from training.data.prepare import prepare_data
    from training.model.loading import compute_dtype, detect_device, load_model, load_tokenizer
    from training.model.lora import lora_config
    from training.recipe import load_recipe
    from training.train.callbacks import Throughput

    recipe = load_recipe(recipe_path, common_overrides(steps))
    device = detect_device()
    dtype = compute_dtype(recipe.model.dtype, device)
    tokenizer = load_tokenizer(recipe.model)
    # Same rows, rendered to the same text as the recipe trains on, then tokenized the tutorial way.
    prepared = prepare_data(recipe.data, tokenizer)
    texts = [tokenizer.decode(ids) for ids in prepared.train["input_ids"]]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(
            b["text"], truncation=True, max_length=recipe.data.max_length, add_special_tokens=False
        ),
        batched=True,
        remove_columns=["text"],
    )
    model, _ = load_model(recipe.model, recipe.quantization, device, dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, lora_config(recipe.lora, model))
    training = recipe.training
    throughput = Throughput()
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=training.get("per_device_train_batch_size", 8),
        gradient_accumulation_steps=training.get("gradient_accumulation_steps", 1),
        learning_rate=float(training.get("learning_rate", 2e-4)),
        save_strategy="no",
        report_to="none",
        logging_steps=100000,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=device.type == "cuda",
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[throughput]
    ).train()
    result = throughput.as_dict()
    return {
        "tokens": result["tokens_trained"],
        "seconds": result["train_seconds"],
        "steady_tokens_per_second": result["steady_tokens_per_second"],
    }


def child(variant: str, recipe_path: str, steps: str, result_file: str) -> None:
    import torch
    from transformers import AutoConfig

    from training.model.tiny import resolve_model_name
    from training.recipe import load_recipe

    with tempfile.TemporaryDirectory() as out:
        if variant == "tutorial":
            result = run_tutorial(recipe_path, int(steps), out)
        else:
            result = run_recipe(recipe_path, int(steps), out, variant)
    recipe = load_recipe(recipe_path, [])
    batch = recipe.training.get("per_device_train_batch_size", 8)
    config = AutoConfig.from_pretrained(resolve_model_name(recipe.model.name))
    result["flops_per_token"] = flops_per_token(config, result["tokens"] / int(steps) / batch)
    if torch.cuda.is_available():
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        result["gpu"] = torch.cuda.get_device_name()
    Path(result_file).write_text(json.dumps(result))


def measure(variant: str, recipe: str, steps: int) -> dict:
    """One run in a fresh process; the parent imports no torch, so the child's peak RSS is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result_file:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", variant, recipe, str(steps), result_file.name],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(
                f"{variant} run failed (status {status}); run it alone to see why: "
                f"python {__file__} --child {variant} {recipe} {steps} /tmp/r.json"
            )
        result = json.loads(Path(result_file.name).read_text())
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    # After the first step where the run had more than one; the whole run otherwise.
    result["tokens_per_second"] = result["steady_tokens_per_second"] or result["tokens"] / result["seconds"]
    return result


def peak_flops(gpu: str | None, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for name, tflops in GPU_PEAK_TFLOPS.items():
        if gpu and name in gpu:
            return tflops * 1e12
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated, from: {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS}); tutorial is the baseline",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the GPU's dense bf16 peak, for MFU (default: known GPUs)",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or variants[0] != "tutorial":
        parser.error(
            f"--variants: {', '.join(unknown) or args.variants!r}: each must be one of {', '.join(VARIANTS)}, "
            "and the list starts with tutorial (the baseline of the ratios)"
        )

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(args.repeats):
        for variant in variants:
            t = time.perf_counter()
            runs[variant].append(measure(variant, args.recipe, args.steps))
            r = runs[variant][-1]
            memory = r.get("peak_cuda_bytes") or r["peak_rss_bytes"]
            print(
                f"[{i + 1}/{args.repeats}] {variant:<22} {r['tokens_per_second']:8.0f} tokens/s, "
                f"{r['tokens'] / args.steps:6.0f} tokens/step, peak {memory / 2**30:5.2f} GiB "
                f"({time.perf_counter() - t:.0f} s with start-up)",
                flush=True,
            )

    summary = {}
    for variant, results in runs.items():
        memory_key = "peak_cuda_bytes" if "peak_cuda_bytes" in results[0] else "peak_rss_bytes"
        summary[variant] = {
            "tokens_per_second": round(statistics.median(r["tokens_per_second"] for r in results), 1),
            "tokens_per_step": round(statistics.median(r["tokens"] for r in results) / args.steps, 1),
            "peak_memory_bytes": int(statistics.median(r[memory_key] for r in results)),
            "memory_measure": memory_key,
        }
        peak = peak_flops(results[0].get("gpu"), args.peak_tflops)
        flops = results[0].get("flops_per_token")
        summary[variant]["mfu"] = (
            round(summary[variant]["tokens_per_second"] * flops / peak, 4) if peak and flops else None
        )
    base = summary["tutorial"]
    for s in summary.values():
        s["speed_vs_tutorial"] = round(s["tokens_per_second"] / base["tokens_per_second"], 2)
        s["memory_vs_tutorial"] = round(s["peak_memory_bytes"] / base["peak_memory_bytes"], 2)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "gpu": next(iter(runs.values()))[0].get("gpu"),
        "recipe": args.recipe,
        "steps": args.steps,
        "repeats": args.repeats,
        "results": summary,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{'variant':<22}{'tokens/s':>10}{'tokens/step':>13}{'peak memory':>13}{'speed':>8}{'memory':>8}{'MFU':>7}"
    )
    for variant, s in summary.items():
        mfu = f"{s['mfu']:.1%}" if s["mfu"] is not None else "-"
        print(
            f"{variant:<22}{s['tokens_per_second']:>10.0f}{s['tokens_per_step']:>13.0f}"
            f"{s['peak_memory_bytes'] / 2**20:>10.0f} MB{s['speed_vs_tutorial']:>7.2f}x"
            f"{s['memory_vs_tutorial']:>7.2f}x{mfu:>7}"
        )
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
