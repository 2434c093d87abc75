"""Load benchmark: N streamed requests at each concurrency C, against TGI, vLLM or the local server.

    python -m serving.bench --url http://127.0.0.1:8080 --requests 32 --concurrency 1,4,16

For each concurrency it reports time to first token (TTFT), inter-token latency (ITL: a
request's decode time divided by its tokens after the first), end-to-end latency,
output tokens per second over the whole run, and errors by type. Results go to
bench/results/<time>/bench.json and a plot of latency against concurrency to latency.png.
Requests are not retried (a 429 is a result here), unless --retries says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from serving.client import ServingClient
from serving.errors import ServingError
from serving.params import SamplingParams
from serving.transport import RetryPolicy

DEFAULT_PROMPTS = Path("data/ja_dolly.jsonl")
FALLBACK_PROMPTS = (
    "Explain in two sentences what a LoRA adapter is.",
    "Write a haiku about the sea.",
    "List three uses of a paper clip.",
    "What is the capital of Japan, and why is it famous?",
)


@dataclass
class Sample:
    ok: bool
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0

    @property
    def itl(self) -> float | None:
        if not self.ok or self.tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class PromptsError(ValueError):
    """A --prompts file that cannot give prompts: the message names the file (and line)."""


def load_prompts(path: Path | None, limit: int = 64) -> list[str]:
    """Prompts from a .jsonl file (fields prompt, instruction, text or the last user message).

    None: the shipped data/ja_dolly.jsonl where it is found (run from the project's root),
    else four built-in prompts. A file that was named must exist and hold prompts.
    """
    if path is None:
        path = DEFAULT_PROMPTS if DEFAULT_PROMPTS.is_file() else None
        if path is None:
            return list(FALLBACK_PROMPTS)
    if not path.is_file():
        raise PromptsError(f"--prompts {path}: no such file (a .jsonl with one prompt per line)")
    prompts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise PromptsError(f"{path}, line {number}: not JSON ({e})") from None
            text = _prompt_of(row) if isinstance(row, dict) else None
            if isinstance(text, str) and text.strip():
                prompts.append(text)
            if len(prompts) >= limit:
                break
    if not prompts:
        raise PromptsError(
            f"{path}: no prompts in it; each line needs a non-empty prompt, instruction or text field, "
            "or messages with a user message"
        )
    return prompts


def _prompt_of(row: dict[str, Any]) -> Any:
    text = row.get("prompt") or row.get("instruction") or row.get("text")
    if not text and isinstance(row.get("messages"), list):
        users = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        text = users[-1] if users else None
    return text


def one_request(client: ServingClient, api: str, prompt: str, params: SamplingParams) -> Sample:
    start = time.perf_counter()
    first = None
    tokens = counted = 0
    try:
        chunks = client.chat_stream(prompt, params) if api == "chat" else client.stream(prompt, params)
        for chunk in chunks:
            if first is None and chunk.text:
                first = time.perf_counter() - start
            if chunk.tokens:
                counted += chunk.tokens
            elif chunk.text:
                counted += 1
            if chunk.generated_tokens is not None:
                tokens = chunk.generated_tokens
    except ServingError as e:
        return Sample(ok=False, error=type(e).__name__)
    end = time.perf_counter() - start
    # Servers may pack several tokens into one chunk; their final count wins when they give one.
    return Sample(ok=True, ttft=first if first is not None else end, e2e=end, tokens=tokens or counted)


def run_level(
    client: ServingClient, api: str, prompts: list[str], params: SamplingParams, n: int, concurrency: int, bar
) -> dict[str, Any]:
    samples: list[Sample] = []
    lock = threading.Lock()

    def task(i: int) -> None:
        sample = one_request(client, api, prompts[i % len(prompts)], params)
        with lock:
            samples.append(sample)
            bar.update(1)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(task, range(n)))
    wall = time.perf_counter() - started
    return summarize(samples, concurrency, wall)


def summarize(samples: list[Sample], concurrency: int, wall: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    ms = 1000.0

    def stat(values: list[float | None], q: float) -> float | None:
        got = percentile([v for v in values if v is not None], q)
        return round(got * ms, 2) if got is not None else None

    tokens = sum(s.tokens for s in ok)
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "errors": dict(Counter(s.error for s in samples if not s.ok)),
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_ms": {"p50": stat([s.ttft for s in ok], 50), "p95": stat([s.ttft for s in ok], 95)},
        "itl_ms": {"p50": stat([s.itl for s in ok], 50), "p95": stat([s.itl for s in ok], 95)},
        "e2e_ms": {"p50": stat([s.e2e for s in ok], 50), "p95": stat([s.e2e for s in ok], 95)},
        "mean_output_tokens": round(statistics.mean([s.tokens for s in ok]), 1) if ok else None,
    }


def plot(levels: list[dict[str, Any]], path: Path, title: str) -> None:

    xs = [lv["concurrency"] for lv in levels]
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    metrics = (("ttft_ms", "TTFT", "C0"), ("itl_ms", "ITL", "C1"), ("e2e_ms", "end to end", "C2"))
    for key, label, color in metrics:
        for q, style in (("p50", "-o"), ("p95", "--^")):
            ys = [lv[key][q] for lv in levels]
            if any(y is not None for y in ys):
                left.plot(xs, ys, style, color=color, label=f"{label} {q}")
    left.set(xlabel="concurrent requests", ylabel="latency (ms)", xscale="log", yscale="log", title="Latency")
    left.legend(fontsize=8)
    right.plot(xs, [lv["output_tokens_per_s"] for lv in levels], "-o")
    right.set(xlabel="concurrent requests", ylabel="output tokens / s", xscale="log", title="Throughput")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.minorticks_off()
        ax.set_xticks(xs, [str(x) for x in xs])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(levels: list[dict[str, Any]]) -> str:
    rows = [
        "| concurrency | requests | errors | TTFT p50 / p95 (ms) | ITL p50 / p95 (ms) | e2e p50 (ms) | output tokens/s |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for lv in levels:
        errors = ", ".join(f"{k}: {v}" for k, v in lv["errors"].items()) or "0"
        rows.append(
            f"| {lv['concurrency']} | {lv['requests']} | {errors} | {lv['ttft_ms']['p50']} / {lv['ttft_ms']['p95']} "
            f"| {lv['itl_ms']['p50']} / {lv['itl_ms']['p95']} | {lv['e2e_ms']['p50']} | {lv['output_tokens_per_s']} |"
        )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=None, help="server URL (default: $SERVE_URL or http://127.0.0.1:8080)"
    )
    parser.add_argument(
        "--requests", "-n", type=int, default=32, help="requests per concurrency level (default 32)"
    )
    parser.add_argument(
        "--concurrency", "-c", default="1,4,16", help="comma-separated levels (default 1,4,16)"
    )
    parser.add_argument(
        "--api", choices=["chat", "generate"], default="chat", help="chat (any server) or generate"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help=f".jsonl of prompts (default: {DEFAULT_PROMPTS} from the project's root, else built-in ones)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="requests sent before measuring (default 1)")
    parser.add_argument(
        "--retries", type=int, default=0, help="retries on 429/503 (default 0: count them as errors)"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default bench/results/<time>)"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    try:
        levels_wanted = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        print(
            f"error: --concurrency takes whole numbers like 1,4,16, got {args.concurrency!r}", file=sys.stderr
        )
        return 2
    if args.requests < 1 or not levels_wanted or min(levels_wanted) < 1:
        print("error: --requests and every --concurrency level must be >= 1", file=sys.stderr)
        return 2
    retry = RetryPolicy(max_attempts=args.retries + 1, deadline=args.timeout)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    try:
        prompts = load_prompts(args.prompts)
    except PromptsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or Path("bench/results") / time.strftime("%Y%m%d-%H%M%S")
    try:
        # Prompts are checked against the limits by the server itself, not once more per request here.
        with ServingClient(args.url, timeout=args.timeout, retry=retry, check_limits=False) as client:
            info = client.wait_until_healthy(timeout=60)
            for i in range(args.warmup):
                one_request(client, args.api, prompts[i % len(prompts)], params)
            levels = []
            with tqdm(total=args.requests * len(levels_wanted), disable=args.no_progress, unit="req") as bar:
                for c in levels_wanted:
                    bar.set_description(f"concurrency {c}")
                    levels.append(run_level(client, args.api, prompts, params, args.requests, c, bar))
    except ServingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m serving.bench", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "server": {k: v for k, v in asdict(info).items() if k != "raw"},
        "api": args.api,
        "params": asdict(params),
        "prompts": {"source": _prompts_source(args.prompts), "count": len(prompts)},
        "levels": levels,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot(
        levels,
        out / "latency.png",
        f"{info.name}: '{info.model}', {args.api}, max_new_tokens={args.max_new_tokens}",
    )
    print(table(levels))
    print(f"\nresults: {out / 'bench.json'}\nplot:    {out / 'latency.png'}")
    return 0


def _prompts_source(path: Path | None) -> str:
    if path is not None:
        return str(path)
    return str(DEFAULT_PROMPTS) if DEFAULT_PROMPTS.is_file() else "built-in"


def _cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
