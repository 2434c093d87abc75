"""Merge time and peak memory: peft's merge_and_unload + save_pretrained against `python -m training merge`.

Builds a Llama-shaped model with random weights (about 1.1B parameters by default, the
shape of TinyLlama-1.1B, saved in bf16) and a random rank-16 LoRA adapter on every linear
layer, then merges the same adapter several ways, each in a fresh process so that its peak
resident memory is its own:

    peft        from_pretrained + merge_and_unload + save_pretrained (no check at all)
    default     python -m training merge, as users run it: streaming merge, streamed
                verification (one decoder layer in memory), serving check
    no-verify   python -m training merge --verify off
    full        python -m training merge --verify full (both models loaded whole)

Wall time is the whole process (imports included); the merge and verification seconds come
from merge.json. Ratios are against peft. With --repeats N the variants run interleaved N
times and the median of each is reported.

    python bench/merge.py                                 # ~1.1B parameters, ~2.2 GB on disk
    python bench/merge.py --layers 2 --hidden 256 --intermediate 688   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# variant -> the merge command's extra arguments (None: peft's own merge, run by this script)
VARIANTS = {"peft": None, "default": [], "no-verify": ["--verify", "off"], "full": ["--verify", "full"]}


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


def peft_merge(base_dir: str, adapter_dir: str, out_dir: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, max_shard_size="2GB")


def measure(command: list[str], label: str) -> dict:
    """Run one step in a fresh process and return its time and its own peak RSS.

    The parent never imports torch: Linux carries a process's peak RSS across exec, so a
    child forked from a large parent would report the parent's peak as its own.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{label} failed (status {status}): {' '.join(command)}")
    # CPU seconds (user + system) as well: on a shared machine they move less with the load than wall time.
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
    }


def run_variant(variant: str, workdir: Path) -> dict:
    out = workdir / f"merged-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    base, adapter = str(workdir / "base"), str(workdir / "adapter")
    extra = VARIANTS[variant]
    if extra is None:
        command = [sys.executable, __file__, "--child", "peft", base, adapter, str(out)]
    else:
        command = [sys.executable, "-m", "training", "merge", "--adapter", adapter, "--out", str(out), *extra]
    load = os.getloadavg()[0]
    result = {"variant": variant, **measure(command, variant), "load_average_1m": load}
    print(
        f"{variant}: {result['seconds']} s, {result['peak_rss_bytes'] / 2**30:.2f} GB (load {load:.1f})",
        flush=True,
    )
    if extra is not None:
        record = json.loads((out / "merge.json").read_text())
        result["merge_seconds"] = record["merge_seconds"]
        verification = record["verification"]
        if verification:
            keep = ("mode", "seconds", "relative_diff", "top1_agreement", "tokens", "peak_memory")
            result["verification"] = {k: verification[k] for k in keep if k in verification}
    shutil.rmtree(out, ignore_errors=True)
    return result


def summarize(runs: list[dict], variants: list[str]) -> list[dict]:
    """The median of each variant's runs, with its ratios to peft's."""
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        row = {
            "variant": variant,
            "runs": len(mine),
            "seconds": statistics.median(r["seconds"] for r in mine),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in mine),
            "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in mine)),
        }
        if "merge_seconds" in mine[0]:
            row["merge_seconds"] = statistics.median(r["merge_seconds"] for r in mine)
        if "verification" in mine[0]:
            row["verification"] = mine[len(mine) // 2]["verification"]
            row["verification"]["seconds"] = statistics.median(r["verification"]["seconds"] for r in mine)
        rows.append(row)
    peft = next((r for r in rows if r["variant"] == "peft"), None)
    if peft:
        for row in rows:
            row["time_ratio"] = round(row["seconds"] / peft["seconds"], 3)
            row["cpu_ratio"] = round(row["cpu_seconds"] / peft["cpu_seconds"], 3)
            row["memory_ratio"] = round(row["peak_rss_bytes"] / peft["peak_rss_bytes"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument(
        "--variants",
        default="peft,default,no-verify,full",
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each variant")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the model is built (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "merge.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        if what == "build":
            build(Path(rest[0]), *map(int, rest[1:]))
        else:
            peft_merge(*rest)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    try:
        if not (workdir / "params.json").is_file():
            shape = [str(args.hidden), str(args.intermediate), str(args.layers)]
            built = measure([sys.executable, __file__, "--child", "build", str(workdir), *shape], "build")
            print(f"built in {built['seconds']:.0f} s: {workdir}")
        params = json.loads((workdir / "params.json").read_text())["parameters"]
        print(f"a {params / 1e9:.2f}B-parameter Llama; variants {', '.join(variants)} x {args.repeats}")
        runs = [run_variant(v, workdir) for _ in range(args.repeats) for v in variants]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = summarize(runs, variants)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "load_average": os.getloadavg(),
        "parameters": params,
        "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers},
        "results": rows,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{'variant':<10} {'wall s':>7} {'cpu s':>7} {'peak RSS':>10} {'time':>7} {'cpu':>7} {'memory':>7}  merge s  verify"
    )
    for r in rows:
        v = r.get("verification")
        check = f"{v['mode']} {v['seconds']} s" if v else "-"
        print(
            f"{r['variant']:<10} {r['seconds']:>7.1f} {r['cpu_seconds']:>7.1f} {r['peak_rss_bytes'] / 2**30:>7.2f} GB"
            f" {r.get('time_ratio', float('nan')):>6.2f}x {r.get('cpu_ratio', float('nan')):>6.2f}x"
            f" {r.get('memory_ratio', float('nan')):>6.2f}x"
            f"  {r.get('merge_seconds', '-')!s:>7}  {check}"
        )
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
