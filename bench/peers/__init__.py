"""LLaMA-Factory, axolotl and Unsloth beside the recipe in bench/train_throughput.py, each in its own environment.

Each peer is installed into a virtual environment of its own from the pinned lists here
(`<peer>.txt`: the versions of every package as installed and measured, used as pip
constraints), and configured from the same settings as the recipe: the same local model, the
same rows rendered to the same text by this stack's own data preparation (prompt without loss,
response with loss), the same LoRA, 4-bit quantization, batch size, maximum length, learning
rate schedule, steps and activation checkpointing. What neither tool lets us fix the same
way is left at its own default (LLaMA-Factory pads batches to a multiple of 8; both draw random
batches). Both are timed by this stack's own Throughput callback (training/train/throughput.py,
loaded by path inside their environments): data tokens (padding excluded) per second after the
first optimizer step; peak RSS is measured by the bench as for every variant.

Facts that shaped the settings (LLaMA-Factory 0.9.5, axolotl 0.21.0, found on the CPU):
- axolotl needs Python >= 3.12; LLaMA-Factory runs on the stack's 3.11.
- Both pull PyPI's CUDA build of torch unless told otherwise; LLaMA-Factory accepts the stack's
  torch 2.13.0 (the CPU build where the machine's index has it). No CPU wheel of a torch axolotl
  accepts exists for Python 3.12 here, and the CUDA build costs about 450 MB more RSS at import:
  read axolotl's memory with that in mind.
- torchvision's PyPI wheel fails to import with CPU torch and breaks transformers' imports; it is
  removed (LLaMA-Factory's text training does not use it). torchaudio's compiled extension links
  to CUDA torch; without its .so files it imports as pure Python, which is all LLaMA-Factory needs.
- axolotl's fused LoRA kernels are Triton (GPU) kernels and fail on the CPU: off there.
- axolotl's alpaca template adds a long preamble and LLaMA-Factory's templates their own
  markers: both are fed pre-rendered text (LLaMA-Factory `template: empty`, axolotl
  `type: input_output`), which they tokenize as prompt and response with no tokens of their own.
- LLaMA-Factory's `learning_rate: 5e-3` in YAML is a string to PyYAML: configs are written as JSON.

Unsloth (2026.10.9, Python 3.11) is driven by bench/peers/unsloth_train.py as its documentation
does (FastLanguageModel, get_peft_model, TRL's SFTTrainer) on this stack's tokens. On a machine
without a GPU it trains through its own CPU path (unsloth_zoo.cpu: bitsandbytes' 4-bit layers,
its chunked cross-entropy), which is what its users get there. pip gives it a CUDA build of
torch (2.14.1 here), whose libraries count in its RSS as in axolotl's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
THROUGHPUT = HERE.parent.parent / "training" / "train" / "throughput.py"
READY = ".bench-ready"  # written last: a venv without it is a half-finished install


@dataclass(frozen=True)
class Peer:
    name: str
    python: str  # the interpreter the venv is made from
    requirements: tuple[str, ...]  # what pip installs (constrained by <name>.txt)
    version_of: str  # the distribution whose version identifies the install

    @property
    def constraints(self) -> Path:
        return HERE / f"{self.name}.txt"

    @property
    def pinned_version(self) -> str:
        for line in self.constraints.read_text().splitlines():
            if line.lower().startswith(f"{self.version_of}=="):
                return line.split("==", 1)[1]
        raise SystemExit(f"{self.constraints}: no pin for {self.version_of}")


PEERS = {
    "llamafactory": Peer(
        "llamafactory",
        python="python3.11",
        requirements=("torch==2.13.0", "llamafactory==0.9.5", "bitsandbytes==0.50.2"),
        version_of="llamafactory",
    ),
    "axolotl": Peer(
        "axolotl",
        python="python3.12",
        requirements=("axolotl==0.21.0", "bitsandbytes==0.50.2"),
        version_of="axolotl",
    ),
    "unsloth": Peer(
        "unsloth",
        python="python3.11",
        requirements=("unsloth==2026.10.9",),
        version_of="unsloth",
    ),
}


def venv_version(venv: Path, peer: Peer) -> str | None:
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    probe = f"import importlib.metadata as m; print(m.version({peer.version_of!r}))"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_venv(peer: Peer, venv: Path, *, given: bool, python: str | None = None) -> Path:
    """The peer's environment: a given one is checked, a missing or half-made one is (re)built."""
    found = venv_version(venv, peer)
    if given:
        if found != peer.pinned_version:
            raise SystemExit(
                f"--peer-venv {peer.name}={venv}: has {peer.version_of} {found or 'not installed'}, "
                f"the bench pins {peer.pinned_version} ({peer.constraints})"
            )
        return venv
    if found == peer.pinned_version and (venv / READY).is_file():
        return venv
    interpreter = python or _find_interpreter(peer.python)
    if interpreter is None:
        raise SystemExit(
            f"{peer.name} needs {peer.python} to build its environment; none on PATH or under pyenv runs. "
            f"Pass --peer-python {peer.name}=/path/to/{peer.python}"
        )
    print(f"installing {peer.name} {peer.pinned_version} into {venv} (several minutes, a few GB)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-c", str(peer.constraints), *peer.requirements], check=True)
    if peer.name == "llamafactory":
        _cpu_torch_fixes(venv)
    if venv_version(venv, peer) != peer.pinned_version:
        raise SystemExit(f"{venv}: {peer.version_of} {peer.pinned_version} did not install")
    (venv / READY).write_text(json.dumps({"requirements": peer.requirements}) + "\n")
    return venv


def _find_interpreter(name: str) -> str | None:
    """`name` (python3.12) from PATH, else from pyenv's installed versions: pyenv's shim is on PATH
    for every version it has, but fails with 'command not found' unless that version is active."""
    candidates = [shutil.which(name)]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += sorted(map(str, pyenv_root.glob(f"versions/{name.removeprefix('python')}*/bin/{name}")))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-V"], capture_output=True).returncode == 0:
            return candidate
    return None


def _cpu_torch_fixes(venv: Path) -> None:
    """LLaMA-Factory's torchvision and torchaudio come as CUDA builds; with CPU torch they break imports."""
    python = str(venv / "bin" / "python")
    cuda_torch = subprocess.run(
        [python, "-c", "import torch; print(torch.version.cuda or '')"], capture_output=True, text=True
    ).stdout.strip()
    if cuda_torch:
        return
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "-y", "torchvision"], check=True)
    for library in venv.glob("lib/python3*/site-packages/torchaudio/lib/*.so"):
        library.unlink()


def llamafactory_config(s: dict, data_dir: Path, out_dir: Path) -> dict:
    return {
        "model_name_or_path": s["model_dir"],
        "trust_remote_code": False,
        "quantization_bit": 4,
        "quantization_method": "bnb",
        "quantization_type": "nf4",
        "double_quantization": s["double_quant"],
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": s["lora_r"],
        "lora_alpha": s["lora_alpha"],
        "lora_dropout": s["lora_dropout"],
        "lora_target": ",".join(s["lora_targets"]),
        "dataset_dir": str(data_dir),
        "dataset": "rendered",
        "template": "empty",  # adds nothing: BOS and EOS are in the rendered text
        "cutoff_len": s["max_length"],
        "overwrite_cache": True,
        "dataloader_num_workers": 0,
        "packing": False,
        "train_on_prompt": False,
        "disable_gradient_checkpointing": not s["activation_checkpointing"],
        "output_dir": str(out_dir),
        "logging_steps": 100000,
        "save_strategy": "no",
        "plot_loss": False,
        "report_to": "none",
        "per_device_train_batch_size": s["batch"],
        "gradient_accumulation_steps": 1,
        "learning_rate": s["learning_rate"],
        "max_steps": s["steps"],
        "lr_scheduler_type": s["lr_scheduler_type"],
        "warmup_steps": s["warmup_steps"],
        "bf16": s["dtype"] == "bfloat16",
        "fp16": s["dtype"] == "float16",
        "use_cpu": not s["cuda"],
        "include_num_input_tokens_seen": "non_padding",
        "seed": 42,
    }


def axolotl_config(s: dict, data_dir: Path, out_dir: Path) -> dict:
    return {
        "base_model": s["model_dir"],
        "adapter": "qlora",  # bitsandbytes NF4 with double quantization
        "load_in_4bit": True,
        "lora_r": s["lora_r"],
        "lora_alpha": s["lora_alpha"],
        "lora_dropout": s["lora_dropout"],
        "lora_target_modules": s["lora_targets"],
        # axolotl's fused LoRA kernels are Triton kernels: GPUs only.
        **{f"lora_{k}_kernel": s["cuda"] for k in ("qkv", "o", "mlp", "embedding")},
        "datasets": [{"path": str(data_dir / "segments.jsonl"), "ds_type": "json", "type": "input_output"}],
        "train_on_inputs": False,
        "dataset_prepared_path": str(out_dir / "prepared"),
        "dataset_num_proc": 1,
        "val_set_size": 0,
        "sequence_len": s["max_length"],
        "sample_packing": False,
        "pad_to_sequence_len": False,  # pad to the longest row, as the others do (not to a multiple of 64)
        "micro_batch_size": s["batch"],
        "gradient_accumulation_steps": 1,
        "max_steps": s["steps"],
        "learning_rate": s["learning_rate"],
        "optimizer": "adamw_torch",
        "lr_scheduler": s["lr_scheduler_type"],
        "warmup_steps": s["warmup_steps"],
        "weight_decay": 0.0,
        "bf16": s["dtype"] == "bfloat16",
        "fp16": s["dtype"] == "float16",
        "tf32": False,
        "gradient_checkpointing": s["activation_checkpointing"],
        "attn_implementation": "sdpa",
        "output_dir": str(out_dir / "out"),
        "save_strategy": "no",
        "logging_steps": 100000,
        "dataloader_num_workers": 0,
        "seed": 42,
        "plugins": ["axolotl_plugin.ThroughputPlugin"],
    }


def command(peer: Peer, venv: Path, settings: dict, data_dir: Path, work: Path) -> tuple[list[str], dict]:
    """The training command of one run and its environment (PEER_RESULT is added by the caller)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DISABLE_VERSION_CHECK": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",  # axolotl looks for accelerate
        "PYTHONPATH": str(HERE),
        "BENCH_THROUGHPUT": str(THROUGHPUT),
    }
    env.pop("VIRTUAL_ENV", None)
    config = work / f"{peer.name}.json"
    if peer.name == "unsloth":
        config.write_text(json.dumps({"settings": settings, "data_dir": str(data_dir), "out_dir": str(work)}))
        return [str(venv / "bin" / "python"), str(HERE / "unsloth_train.py"), str(config)], env
    if peer.name == "llamafactory":
        config.write_text(json.dumps(llamafactory_config(settings, data_dir, work), indent=1))
        return [str(venv / "bin" / "python"), str(HERE / "llamafactory_train.py"), str(config)], env
    config.write_text(json.dumps(axolotl_config(settings, data_dir, work), indent=1))
    # --launcher python: in this process, as one device trains (no accelerate launch in between).
    return [str(venv / "bin" / "axolotl"), "train", str(config), "--launcher", "python"], env


def installed_versions(venv: Path) -> dict[str, str]:
    """The versions that decide speed, for the report."""
    names = ("torch", "transformers", "peft", "trl", "bitsandbytes", "llamafactory", "axolotl", "unsloth")
    probe = (
        "import importlib.metadata as m, json\n"
        f"out = {{}}\nfor n in {names!r}:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def default_venv_root() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "qlora-stack" / "bench-venvs"
