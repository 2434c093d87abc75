"""Training throughput: a recipe run against the plain QLoRA recipe users copy from tutorials, and the peers.

The tutorial recipe: the same 4-bit model and LoRA, `prepare_model_for_kbit_training`,
text rendered with the same template, `transformers.Trainer` with
`DataCollatorForLanguageModeling(mlm=False)` (pads each batch, loss on every token, no
packing). Against it: the recipe as shipped, variants of it, and LLaMA-Factory, axolotl and Unsloth
(bench/peers: each installed by this script into a virtual environment of its own from pinned
versions, configured to the same model, rendered text, LoRA, batch, length and steps). Each
run in a fresh process, runs interleaved (A B C A B C ...) so machine noise hits every
variant alike. Reported: data tokens (padding excluded) per second of training after its
first step (which also pays for kernel selection and compilation), timed by the same
callback for all (training/train/throughput.py), peak memory (process RSS; peak CUDA memory
allocated on a GPU), ratios to the tutorial recipe, and on a GPU the model FLOPs utilisation (MFU).

    python bench/train_throughput.py                               # quickstart recipe, CPU
    python bench/train_throughput.py --recipe recipes/x.yaml --steps 30 --repeats 3
    python bench/train_throughput.py --variants tutorial,recipe,llamafactory,axolotl,unsloth --repeats 5
    python bench/train_throughput.py --recipe bench/recipes/gpu-7b-varlen.yaml --steps 8 --repeats 1 \
        --variants tutorial,recipe,recipe+packing,recipe+liger,recipe+packing+liger
    python bench/train_throughput.py --recipe bench/recipes/gpu-7b-varlen.yaml --steps 8 --repeats 3 \
        --variants tutorial,recipe,recipe+packing+liger,unsloth
    python bench/train_throughput.py --repeats 1 --profile 3      # + where each variant's step time goes

The peers' environments go to ~/.cache/qlora-stack/bench-venvs (--peer-venv-root), built on
first use (a few minutes and 2-8 GB each); --peer-venv NAME=DIR uses an existing one after
checking its pinned version.

MFU is reported on two bases over the GPU's dense bf16 peak (bench/mfu.py): the model basis,
6 N + 12 L h s per token as PaLM's appendix counts it (comparable with full fine-tuning
reports), and the LoRA basis, 4 N + 6 N_lora + 12 L h s, what LoRA training needs (no weight
gradients for the frozen matmuls), with s the context each training row needs (sum(s^2) / sum(s)
over the rows: the same for every variant, whatever its padding or packing). Recomputation
counts on neither.
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
from dataclasses import dataclass
from pathlib import Path

from mfu import attention_context, flop_terms, flops_per_token, peak_flops
from peers import PEERS, command, default_venv_root, ensure_venv, installed_versions

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Profile:
    steps: int  # optimizer steps recorded, from the run's second
    folder: Path  # where ops.txt and trace.json.gz go


@dataclass(frozen=True)
class Variant:
    overrides: tuple[str, ...] = ()
    measure_memory: bool = False  # as `train --measure-memory`: count live CPU tensors
    trl_loss_head: bool = False  # TRL's chunked loss head on the CPU too, instead of training.train.loss
    peft_dropout: bool = False  # peft's nn.Dropout on the CPU too, instead of training.model.lora_dropout
    # Padding-free batches under SDPA's block mask, instead of training.model.varlen_attention.
    block_mask: bool = False


# The CPU defaults each switched back, one at a time and all together: what each one buys.
BEFORE_CPU_DEFAULTS = Variant(
    ("training.activation_checkpointing=true", "training.train_sampling_strategy=random"),
    measure_memory=True,
    trl_loss_head=True,
    peft_dropout=True,
)
# The GPU defaults of 2026-12-06 switched back all together: the recipe as shipped before them.
BEFORE_GPU_DEFAULTS = Variant(
    (
        "training.activation_checkpointing=true",
        "training.train_sampling_strategy=random",
        "training.use_liger_kernel=false",
    )
)
# "tutorial" is the plain Trainer recipe built below; the peers (bench/peers) are not recipe runs.
VARIANTS = {
    "tutorial": Variant(),
    "recipe": Variant(),
    # TRL packs best-fit-decreasing into padding-free batches (one row of concatenated
    # sequences, position ids restarting per sequence): more rows per step.
    "recipe+packing": Variant(("data.packing=true",)),
    # The same rows per step as the recipe, flattened into one sequence without padding.
    "recipe+padding-free": Variant(("training.padding_free=true",)),
    # Packed batches as before 2026-12-07: one block-diagonal mask over the batch, SDPA over all of it.
    "recipe+packing+block-mask": Variant(("data.packing=true",), block_mask=True),
    "recipe+liger": Variant(("training.use_liger_kernel=true",)),
    "recipe+packing+liger": Variant(("data.packing=true", "training.use_liger_kernel=true")),
    "recipe-checkpointing": Variant(("training.activation_checkpointing=false",)),
    "recipe+packing-checkpointing": Variant(("data.packing=true", "training.activation_checkpointing=false")),
    "recipe+packing+liger-checkpointing": Variant(
        ("data.packing=true", "training.use_liger_kernel=true", "training.activation_checkpointing=false")
    ),
    "recipe+packing+liger-checkpointing+block-mask": Variant(
        ("data.packing=true", "training.use_liger_kernel=true", "training.activation_checkpointing=false"),
        block_mask=True,
    ),
    "recipe+checkpointing": Variant(("training.activation_checkpointing=true",)),
    "recipe+random-batches": Variant(("training.train_sampling_strategy=random",)),
    "recipe+trl-loss-head": Variant(trl_loss_head=True),
    "recipe+peft-dropout": Variant(peft_dropout=True),
    "recipe+measure-memory": Variant(measure_memory=True),
    "recipe+before-cpu-defaults": BEFORE_CPU_DEFAULTS,
    "recipe-liger": Variant(("training.use_liger_kernel=false",)),
    "recipe+before-gpu-defaults": BEFORE_GPU_DEFAULTS,
    "recipe+compile": Variant(("training.torch_compile=true",)),
    **{name: Variant() for name in PEERS},
}
DEFAULT_VARIANTS = "tutorial,recipe,recipe+packing"


def common_overrides(steps: int) -> list[str]:
    return [
        f"training.max_steps={steps}",
        "training.save_steps=100000",
        "data.validation=null",
        "training.logging_steps=100000",
    ]


def switch_backs(variant: Variant) -> list[tuple[object, str, object]]:
    """The stack's names a variant replaces, as (module, name, replacement), to switch a CPU default back.

    Each name must exist where it is replaced: a default that moves must move here too, or the
    variant would silently measure the recipe as shipped (tests/bench checks each one).
    """
    from training.train import builder, device_defaults

    found = []
    if variant.trl_loss_head:
        from trl import SFTTrainer

        found.append(
            (builder, "QLoRASFTTrainer", SFTTrainer)
        )  # what the stack built before its CPU loss head
    if variant.peft_dropout:
        found.append((device_defaults, "fuse_lora_dropout", lambda model: 0))  # peft's dropout modules stay
    if variant.block_mask:
        found.append((builder, "enable_varlen_attention", lambda model: False))  # the model keeps plain SDPA
    return found


def run_recipe(
    recipe_path: str, steps: int, out_dir: str, variant: str, profile: Profile | None = None
) -> dict:
    from training.recipe import load_recipe
    from training.run_dir import RunDir
    from training.train.run import run_training

    chosen = VARIANTS[variant]
    for module, name, replacement in switch_backs(chosen):
        if not hasattr(module, name):
            raise SystemExit(f"{variant}: {module.__name__} has no {name} to switch back")
        setattr(module, name, replacement)
    overrides = [*common_overrides(steps), f"output.dir={out_dir}", *chosen.overrides]
    recipe = load_recipe(recipe_path, overrides)
    profile_steps = profile.steps if profile else 0
    assert (
        run_training(recipe, recipe_path, measure_memory=chosen.measure_memory, profile_steps=profile_steps)
        == 0
    )
    if profile:
        shutil.copytree(RunDir(recipe.output.run_dir()).profile, profile.folder, dirs_exist_ok=True)
    metrics = json.loads((recipe.output.run_dir() / "run.json").read_text())["metrics"]
    return {
        "tokens": metrics["tokens_trained"],
        "seconds": metrics["train_seconds"],
        "steady_tokens_per_second": metrics["steady_tokens_per_second"],
        # Tensor memory during training alone (what `python -m training estimate` predicts).
        "peak_train_bytes": metrics.get("peak_memory_bytes"),
        "estimated_peak_bytes": metrics.get("estimated_peak_memory_bytes"),
    }


def run_tutorial(recipe_path: str, steps: int, out_dir: str, profile: Profile | None = None) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from training.data.prepare import prepare_data
    from training.model.loading import compute_dtype, detect_device, load_model, load_tokenizer
    from training.model.lora import lora_config
    from training.recipe import load_recipe
    from training.train.step_profile import StepProfiler
    from training.train.throughput import Throughput

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
    callbacks = [throughput]
    if profile:
        callbacks.append(StepProfiler(profile.steps, profile.folder, cuda=device.type == "cuda"))
    Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks
    ).train()
    result = throughput.as_dict()
    return {
        "tokens": result["tokens_trained"],
        "seconds": result["train_seconds"],
        "steady_tokens_per_second": result["steady_tokens_per_second"],
    }


def render_for_peers(recipe_path: str, steps: str, out: str) -> None:
    """The recipe's rows as this stack renders them, split into prompt and response, and its settings.

    Written for the peers: rendered.jsonl + dataset_info.json (LLaMA-Factory, alpaca columns),
    segments.jsonl (axolotl input_output) and settings.json. Each row's prompt and response,
    tokenized on their own without added special tokens (as both tools do), must give exactly
    this stack's token ids and loss mask; otherwise the comparison would not be like for like.
    """
    from transformers import AutoConfig

    from training.data.formats import RESPONSE_FORMATS
    from training.data.prepare import prepare_data
    from training.model.loading import compute_dtype, detect_device, load_tokenizer
    from training.model.tiny import resolve_model_name
    from training.recipe import load_recipe
    from training.train.device_defaults import gpu_memory_available
    from training.train.estimate import Shape, activation_checkpointing_default, lora_target_names

    recipe = load_recipe(recipe_path, common_overrides(int(steps)))
    tokenizer = load_tokenizer(recipe.model)
    prepared = prepare_data(recipe.data, tokenizer)
    if "assistant_masks" not in prepared.train.column_names:
        raise SystemExit(
            f"{recipe_path}: the peers need a prompt/response split (format {' or '.join(RESPONSE_FORMATS)})"
        )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with (
        open(folder / "rendered.jsonl", "w", encoding="utf-8") as pairs,
        open(folder / "segments.jsonl", "w", encoding="utf-8") as segments,
    ):
        for row, (ids, mask) in enumerate(
            zip(prepared.train["input_ids"], prepared.train["assistant_masks"], strict=True)
        ):
            start = mask.index(1) if 1 in mask else len(mask)
            if any(m == 0 for m in mask[start:]):
                raise SystemExit(
                    f"{recipe_path}: row {row} has several responses; the peers take one per row"
                )
            prompt = tokenizer.decode(ids[:start])
            response = tokenizer.decode(ids[start:])
            again = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt, response)]
            if again[0] + again[1] != ids:
                raise SystemExit(
                    f"{recipe_path}: row {row}: prompt and response do not tokenize back to its ids"
                )
            pairs.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")
            parts = [{"label": False, "text": prompt}, {"label": True, "text": response}]
            segments.write(json.dumps({"segments": parts}, ensure_ascii=False) + "\n")
    info = {
        "rendered": {"file_name": "rendered.jsonl", "columns": {"prompt": "prompt", "response": "response"}}
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))

    device = detect_device()
    model_dir = resolve_model_name(recipe.model.name)
    config = AutoConfig.from_pretrained(model_dir)
    lora, training = recipe.lora, recipe.training
    shape = Shape.from_config(config)
    targets = [lin.name for lin in shape.linears if lin.name in lora_target_names(lora, shape)]  # layer order
    memory = gpu_memory_available() if device.type == "cuda" else None
    checkpointing = activation_checkpointing_default(recipe, config, device=device.type, memory=memory)
    settings = {
        "model_dir": str(model_dir),
        "double_quant": recipe.quantization.double_quant,
        "lora_r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "lora_targets": targets,
        "max_length": recipe.data.max_length,
        "batch": training.get("per_device_train_batch_size", 8),
        "learning_rate": float(training.get("learning_rate", 2e-4)),
        "lr_scheduler_type": str(training.get("lr_scheduler_type", "linear")),
        "warmup_steps": training.get("warmup_steps", 0),
        "steps": int(steps),
        "activation_checkpointing": checkpointing,  # as the recipe trains on this machine
        "dtype": str(compute_dtype(recipe.model.dtype, device)).removeprefix("torch."),
        "cuda": device.type == "cuda",
        "rows": len(prepared.train),
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=1))


def child(
    variant: str, recipe_path: str, steps: str, result_file: str, profile_steps: str, profile_dir: str
) -> None:
    import torch
    from transformers import AutoConfig

    from training.model.tiny import resolve_model_name
    from training.recipe import load_recipe

    profile = Profile(int(profile_steps), Path(profile_dir)) if int(profile_steps) else None
    with tempfile.TemporaryDirectory() as out:
        if variant == "tutorial":
            result = run_tutorial(recipe_path, int(steps), out, profile)
        else:
            result = run_recipe(recipe_path, int(steps), out, variant, profile)
    if variant == "tutorial":  # the baseline every round starts with: MFU's terms, once a round
        recipe = load_recipe(recipe_path, [])
        config = AutoConfig.from_pretrained(resolve_model_name(recipe.model.name))
        result["flop_terms"] = flop_terms(config, recipe.lora)
        result["attention_context"] = training_rows_context(recipe)
    if torch.cuda.is_available():
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        result["gpu"] = torch.cuda.get_device_name()
    Path(result_file).write_text(json.dumps(result))


def training_rows_context(recipe) -> float:
    """attention_context over the recipe's training rows as this stack tokenizes and truncates them
    (every variant trains on these rows, packed or not)."""
    from training.data.prepare import prepare_data
    from training.model.loading import load_tokenizer

    rows = prepare_data(recipe.data, load_tokenizer(recipe.model)).train["input_ids"]
    return attention_context(len(ids) for ids in rows)


def measure(variant: str, recipe: str, steps: int, profile: Profile | None = None) -> dict:
    """One run in a fresh process; the parent imports no torch, so the child's peak RSS is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result_file:
        profiling = [str(profile.steps), str(profile.folder)] if profile else ["0", "-"]
        cmd = [sys.executable, __file__, "--child", variant, recipe, str(steps), result_file.name, *profiling]
        rerun = [*cmd[:6], "/tmp/r.json", *profiling]  # the temporary result file is gone by then
        usage = run_child(cmd, child_env(), variant, " ".join(rerun))
        result = json.loads(Path(result_file.name).read_text())
    return with_rss(result, usage)


def child_env() -> dict:
    """This checkout first on the path, anything the caller put there after it."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def run_child(cmd: list[str], env: dict, variant: str, rerun: str, log: Path | None = None):
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        where = f"its log: {log}" if log else f"run it alone to see why: {rerun}"
        raise SystemExit(f"{variant} run failed (status {status}); {where}")
    return usage


def measure_peer(name: str, venv: Path, peer_data: Path, steps: int) -> dict:
    """One run of a peer in its own environment, timed by the same callback, its RSS measured the same way."""
    settings = json.loads((peer_data / "settings.json").read_text())
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as work:
        cmd, env = command(PEERS[name], venv, settings, peer_data, Path(work))
        result_file = Path(work) / "result.json"
        log = peer_data / f"{name}.log"  # kept: the last run's log, for when a run fails
        usage = run_child(cmd, {**env, "PEER_RESULT": str(result_file)}, name, " ".join(cmd), log)
        figures = json.loads(result_file.read_text())
    result = {
        "tokens": figures["tokens_trained"],
        "seconds": figures["train_seconds"],
        "steady_tokens_per_second": figures["steady_tokens_per_second"],
        **{key: figures[key] for key in ("peak_cuda_bytes", "gpu") if key in figures},
    }
    return with_rss(result, usage)


def with_rss(result: dict, usage) -> dict:
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    # After the first step where the run had more than one; the whole run otherwise.
    result["tokens_per_second"] = result["steady_tokens_per_second"] or result["tokens"] / result["seconds"]
    return result


def mfus(summary: dict, gpu: str | None, reference: dict | None, peak_tflops: float | None) -> dict:
    """MFU on the model basis (6 N) and on the LoRA basis (4 N + adapters): bench/mfu.py. `reference`:
    the tutorial's result, with the model's flop terms and the training rows' attention context (the same
    for every variant: the work the model needs does not depend on padding or packing)."""
    peak = peak_flops(gpu, peak_tflops)
    if not (peak and reference):
        return {"mfu": None, "mfu_lora": None}
    context = reference["attention_context"]
    return {
        f"mfu{suffix}": round(
            summary["tokens_per_second"] * flops_per_token(reference["flop_terms"], context, basis) / peak, 4
        )
        for suffix, basis in (("", "model"), ("_lora", "lora"))
    }


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
    parser.add_argument(
        "--peer-venv-root",
        type=Path,
        default=default_venv_root(),
        help="where the peers' environments are built on first use (default %(default)s)",
    )
    parser.add_argument(
        "--peer-venv",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="use an existing environment for a peer (its pinned version is checked), e.g. axolotl=/opt/ax",
    )
    parser.add_argument(
        "--peer-python",
        action="append",
        default=[],
        metavar="NAME=PYTHON",
        help="interpreter to build a peer's environment from (default: python3.11 for llamafactory, "
        "python3.12 for axolotl, from PATH)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed rounds, one more run of each variant of this stack (tutorial included) with N "
        "steps recorded by torch.profiler (from the second): per-operator tables and timelines in "
        "<--json without .json>-profile/<variant>/ (training.train.step_profile)",
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--render-for-peers", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.render_for_peers:
        render_for_peers(*args.render_for_peers)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.profile < 0:
        parser.error(f"--profile {args.profile}: the number of steps to profile is 0 (none) or more")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or variants[0] != "tutorial":
        parser.error(
            f"--variants: {', '.join(unknown) or args.variants!r}: each must be one of {', '.join(VARIANTS)}, "
            "and the list starts with tutorial (the baseline of the ratios)"
        )

    venvs = peer_venvs(parser, args, [v for v in variants if v in PEERS])
    peer_data = args.json.parent / "peer-data"
    if venvs:
        cmd = [sys.executable, __file__, "--render-for-peers", args.recipe, str(args.steps), str(peer_data)]
        subprocess.run(cmd, cwd=ROOT, env=child_env(), check=True)

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(args.repeats):
        for variant in variants:
            t = time.perf_counter()
            if variant in PEERS:
                runs[variant].append(measure_peer(variant, venvs[variant], peer_data, args.steps))
            else:
                runs[variant].append(measure(variant, args.recipe, args.steps))
            # After every run, not only at the end, and before saying so: a bench stopped by a time
            # limit (a lent GPU's call) keeps what it measured.
            write_report(args, venvs, runs, complete=False)
            r = runs[variant][-1]
            memory = r.get("peak_cuda_bytes") or r["peak_rss_bytes"]
            # Training's tensor peak beside what the estimator predicts for it, in the same unit.
            trained, estimated = r.get("peak_train_bytes"), r.get("estimated_peak_bytes")
            check = (
                f", training {trained / 2**30:.2f} GiB vs {estimated / 2**30:.2f} estimated"
                if trained and estimated
                else ""
            )
            print(
                f"[{i + 1}/{args.repeats}] {variant:<22} {r['tokens_per_second']:8.0f} tokens/s, "
                f"{r['tokens'] / args.steps:6.0f} tokens/step, peak {memory / 2**30:5.2f} GiB{check} "
                f"({time.perf_counter() - t:.0f} s with start-up)",
                flush=True,
            )

    summary = write_report(args, venvs, runs, complete=True)
    print(
        f"\n{'variant':<22}{'tokens/s':>10}{'tokens/step':>13}{'peak memory':>13}{'speed':>8}{'memory':>8}"
        f"{'MFU':>7}{'LoRA MFU':>10}"
    )
    for variant, s in summary.items():
        mfu, lora = (f"{s[k]:.1%}" if s[k] is not None else "-" for k in ("mfu", "mfu_lora"))
        print(
            f"{variant:<22}{s['tokens_per_second']:>10.0f}{s['tokens_per_step']:>13.0f}"
            f"{s['peak_memory_bytes'] / 2**20:>10.0f} MB{s['speed_vs_tutorial']:>7.2f}x"
            f"{s['memory_vs_tutorial']:>7.2f}x{mfu:>7}{lora:>10}"
        )
    print(f"-> {args.json}")
    if args.profile:
        profile_runs(variants, args)


def write_report(
    args: argparse.Namespace, venvs: dict[str, Path], runs: dict[str, list[dict]], *, complete: bool
) -> dict:
    """The report of the runs so far in args.json (replaced whole, never half-written); its summary.
    `complete` is false until every repeat of every variant has run."""
    measured = {variant: results for variant, results in runs.items() if results}
    summary = {}
    # The model and rows every variant trains (peers included), as the tutorial's runs report them.
    reference = runs["tutorial"][0] if runs["tutorial"][0].get("flop_terms") else None
    for variant, results in measured.items():
        memory_key = "peak_cuda_bytes" if "peak_cuda_bytes" in results[0] else "peak_rss_bytes"
        summary[variant] = {
            "tokens_per_second": round(statistics.median(r["tokens_per_second"] for r in results), 1),
            "tokens_per_step": round(statistics.median(r["tokens"] for r in results) / args.steps, 1),
            "peak_memory_bytes": int(statistics.median(r[memory_key] for r in results)),
            "memory_measure": memory_key,
        }
        summary[variant].update(mfus(summary[variant], results[0].get("gpu"), reference, args.peak_tflops))
    base = summary["tutorial"]
    for s in summary.values():
        s["speed_vs_tutorial"] = round(s["tokens_per_second"] / base["tokens_per_second"], 2)
        s["memory_vs_tutorial"] = round(s["peak_memory_bytes"] / base["peak_memory_bytes"], 2)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "gpu": runs["tutorial"][0].get("gpu"),
        "recipe": args.recipe,
        "steps": args.steps,
        "repeats": args.repeats,
        "complete": complete,
        "peers": {name: installed_versions(venv) for name, venv in venvs.items()},
        "results": summary,
        "runs": measured,
    }
    from training.atomic import write_text

    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.json, json.dumps(report, indent=2) + "\n")
    return summary


def profile_runs(variants: list[str], args: argparse.Namespace) -> None:
    """One profiled run of each variant of this stack (not the peers): where each one's step time goes."""
    root = args.json.with_name(args.json.stem + "-profile")
    for variant in (v for v in variants if v not in PEERS):
        profile = Profile(args.profile, root / variant)
        measure(variant, args.recipe, args.profile + 1, profile)
        print(f"profile of {variant}: {profile.folder / 'ops.txt'}", flush=True)


def peer_venvs(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]
) -> dict[str, Path]:
    """Each peer's environment: the one given with --peer-venv (checked), else built from the pins."""
    given, pythons = {}, {}
    for flag, pairs, into in (
        ("--peer-venv", args.peer_venv, given),
        ("--peer-python", args.peer_python, pythons),
    ):
        for pair in pairs:
            name, _, value = pair.partition("=")
            if name not in PEERS or not value:
                parser.error(f"{flag} {pair!r}: give NAME=PATH with NAME one of {', '.join(PEERS)}")
            into[name] = value
    venvs = {}
    for name in names:
        if name in given:
            venvs[name] = ensure_venv(PEERS[name], Path(given[name]), given=True)
        else:
            venv = args.peer_venv_root / f"{name}-{PEERS[name].pinned_version}"
            venvs[name] = ensure_venv(PEERS[name], venv, given=False, python=pythons.get(name))
    return venvs


if __name__ == "__main__":
    main()
