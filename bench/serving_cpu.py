"""The CPU servers side by side on one merged model: vLLM's CPU engine against the local server.

Starts each server with `python -m serving serve` on the same model (one after the other, each waited
for), keeps them all up, and loads them in turn with `python -m serving.bench`, interleaved: for each
round and each concurrency level, every server once (the order reversed every other round), so that
the load other users put on a shared machine falls on all of them alike. Idle, a server takes no CPU.
Prints one table: output tokens/s and TTFT/ITL percentiles at each level (the median over rounds),
and each server's tokens/s over each local variant's, a ratio taken within each round, then the median.

    python bench/serving_cpu.py                                    # quickstart, c = 1,4,16,64, 2 rounds
    python bench/serving_cpu.py -n 64 -c 1,4,16,64 --max-new-tokens 64 --variants vllm,local,local-1thread
    python bench/serving_cpu.py -n 4 -c 1,4 --max-new-tokens 8 --rounds 1   # a functional run

Variants: vllm (eager, the default start), vllm-compiled (VLLM_CPU_ARGS=--no-enforce-eager),
local, local-1thread (--threads 1). Raw results: bench/results/serving-cpu-<time>/<variant>/r<round>-c<level>/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "vllm": (["--backend", "vllm"], {}),
    "vllm-compiled": (["--backend", "vllm"], {"VLLM_CPU_ARGS": "--no-enforce-eager"}),
    "local": (["--backend", "local"], {}),
    "local-1thread": (["--backend", "local", "--threads", "1"], {}),
}
START_TIMEOUT = 900


def start(variant: str, run: str, log: Path, stack: ExitStack) -> str:
    """Start one server (stopped when `stack` closes); its URL once it answers."""
    args, env = VARIANTS[variant]
    log.parent.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "serve", "--run", run, "--port", "0", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    stack.callback(stop, server)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(r"URL\s+(http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if server.poll() is not None:
            raise SystemExit(f"{variant}: the server exited with {server.returncode}; see {log}")
        time.sleep(1)
    raise SystemExit(f"{variant}: no server within {START_TIMEOUT} s; see {log}")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def load(url: str, concurrency: int, args: argparse.Namespace, out: Path) -> dict:
    """One serving.bench level against `url`; its result for that level."""
    bench = [
        sys.executable, "-m", "serving.bench", "--url", url, "-n", str(args.requests), "-c", str(concurrency),
        "--max-new-tokens", str(args.max_new_tokens), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    subprocess.run(bench, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    (level,) = json.loads((out / "bench.json").read_text(encoding="utf-8"))["levels"]
    return level


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def table(results: dict[str, dict[int, list[dict]]], baselines: list[str]) -> str:
    """results[variant][concurrency]: that level's result in each round. One ratio column per baseline."""
    rows = [
        "| server | concurrency | output tokens/s | TTFT p50 / p95 (ms) | ITL p50 / p95 (ms) | errors |"
        + "".join(f" tokens/s vs {b} |" for b in baselines),
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(baselines),
    ]
    for variant, levels in results.items():
        for concurrency, rounds in levels.items():
            ratios = []
            for baseline in baselines:
                within_round = [
                    r["output_tokens_per_s"] / b["output_tokens_per_s"]
                    for r, b in zip(rounds, results[baseline][concurrency], strict=True)
                    if b["output_tokens_per_s"]
                ]
                ratios.append(f"{statistics.median(within_round):.2f}x" if within_round else "")
            rows.append(
                f"| {variant} | {concurrency} | {median([r['output_tokens_per_s'] for r in rounds])} "
                f"| {median([r['ttft_ms']['p50'] for r in rounds])} / {median([r['ttft_ms']['p95'] for r in rounds])} "
                f"| {median([r['itl_ms']['p50'] for r in rounds])} / {median([r['itl_ms']['p95'] for r in rounds])} "
                f"| {sum(sum(r['errors'].values()) for r in rounds)} |" + "".join(f" {r} |" for r in ratios)
            )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="quickstart", help="the merged run to serve (outputs/<run>/merged)")
    parser.add_argument("--requests", "-n", type=int, default=64, help="requests per level and round")
    parser.add_argument("--concurrency", "-c", default="1,4,16,64")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="times each level is measured on each server")
    parser.add_argument(
        "--variants", default="vllm,local", help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency {args.concurrency!r}: comma-separated whole numbers, e.g. 1,4,16")
    out = ROOT / "bench" / "results" / time.strftime("serving-cpu-%Y%m%d-%H%M%S")
    # A SIGTERM (timeout, kill) unwinds like Ctrl-C, so the servers are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, dict[int, list[dict]]] = {v: {c: [] for c in levels} for v in variants}
    with ExitStack() as stack:
        urls = {v: start(v, args.run, out / v / "server.log", stack) for v in variants}
        for round_ in range(args.rounds):
            for concurrency in levels:
                for variant in variants if round_ % 2 == 0 else variants[::-1]:
                    level_out = out / variant / f"r{round_}-c{concurrency}"
                    results[variant][concurrency].append(load(urls[variant], concurrency, args, level_out))
                    print(f"round {round_ + 1}/{args.rounds}, c={concurrency}: {variant} done", flush=True)
    text = table(results, [v for v in variants if v.startswith("local")])
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    print(f"\n{text}\n\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
