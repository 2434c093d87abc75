"""Merge time and peak memory: the streaming merge against peft's merge_and_unload + save_pretrained.

Builds a Llama-shaped model with random weights (about 1.1B parameters by default, the
shape of TinyLlama-1.1B, saved in bf16) and a random rank-16 LoRA adapter on every linear
layer, then merges the same adapter both ways, each in a fresh process so that its peak
resident memory is its own. Verification is off for both (it loads the model twice by
design and is not part of the comparison).

    python bench/merge.py                     # ~1.1B parameters, ~2.2 GB on disk
    python bench/merge.py --layers 2          # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(workdir: Path, hidden: int, intermediate: int, layers: int) -> None:
    from peft import LoraConfig, get_peft_model

    from bench.synthetic import random_llama
    from training.model.tiny import ensure_tiny_model

    base_dir, adapter_dir = workdir / "base", workdir / "adapter"
    model = random_llama(hidden, intermediate, layers, heads=hidden // 64, kv_heads=4)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base_dir, max_shard_size="2GB")
    model.name_or_path = str(base_dir)  # recorded by peft as the adapter's base model
    lora = LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    get_peft_model(model, lora).save_pretrained(adapter_dir)
    # The merge copies the adapter's tokenizer into the merged model; any tokenizer serves here.
    tokenizer_src = ensure_tiny_model("llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / name, adapter_dir / name)
    (workdir / "params.json").write_text(json.dumps({"parameters": params}))


def child(path: str, *args: str) -> None:
    """Runs in its own process: the build, or one merge path, nothing else."""
    if path == "build":
        build(Path(args[0]), *map(int, args[1:]))
        return
    base_dir, adapter_dir, out_dir = args
    if path == "streaming":
        from training.merge.coordinator import MergeSettings, merge_adapter

        merge_adapter(adapter_dir, out_dir, MergeSettings(verify=False, max_shard_size="2GB"))
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        merged.save_pretrained(out_dir, max_shard_size="2GB")


def measure(*child_args: str) -> dict:
    """Run one step in a fresh process and return its time and its own peak RSS.

    The parent never imports torch: Linux carries a process's peak RSS across exec, so a
    child forked from a large parent would report the parent's peak as its own.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", *child_args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{child_args[0]} failed (status {status})")
    return {"path": child_args[0], "seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the model is built (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "merge.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    try:
        built = measure("build", str(workdir), str(args.hidden), str(args.intermediate), str(args.layers))
        params = json.loads((workdir / "params.json").read_text())["parameters"]
        print(f"built a {params / 1e9:.2f}B-parameter Llama in {built['seconds']:.0f} s: {workdir}")
        base_dir, adapter_dir = workdir / "base", workdir / "adapter"
        results = [
            measure(p, str(base_dir), str(adapter_dir), str(workdir / f"merged-{p}"))
            for p in ("peft", "streaming")
        ]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    peft, streaming = results
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "parameters": params,
        "results": results,
        "memory_ratio": round(streaming["peak_rss_bytes"] / peft["peak_rss_bytes"], 3),
        "time_ratio": round(streaming["seconds"] / peft["seconds"], 3),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'path':<10} {'seconds':>8} {'peak RSS':>10}")
    for r in results:
        print(f"{r['path']:<10} {r['seconds']:>8} {r['peak_rss_bytes'] / 2**30:>8.2f} GB")
    print(
        f"streaming / peft: memory {summary['memory_ratio']:.2f}x, time {summary['time_ratio']:.2f}x -> {args.json}"
    )


if __name__ == "__main__":
    main()
