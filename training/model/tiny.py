"""Tiny real models, built offline, so every path runs on any machine without a hub.

`tiny://llama`, `tiny://llama-tied`, `tiny://gpt-neox`, `tiny://qwen2` and `tiny://llama3` in a recipe name
models with a few layers and random weights, and a byte-level BPE tokenizer trained on the
text that ships in data/. They are built on first use under $QLORA_TINY_DIR (default
outputs/tiny-models) and are identical on every machine: same data, same seed.

`tiny://qwen2` is shaped as Qwen2.5-Instruct comes: biases on the query, key and value
projections, ChatML's tokens, no BOS, and Qwen2.5's own chat template, which renders tool
calls and tool results (the copy TRL ships, trl/chat_templates/qwen2_5.jinja). It is the
tiny model for `data.template: model` and for chats with tool calls. `tiny://llama3` is shaped as
Llama-3.1-Instruct comes: its header and end-of-turn tokens (<|eot_id|> is EOS), BOS written by the
template, and Llama 3.1's own chat template (trl/chat_templates/llama3_1.jinja), which writes a
tool call as bare JSON and has no {% generation %} markers, nor a training version in TRL.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
import trl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from training.atomic import building_dir
from training.data.templates import BUILTIN_TEMPLATES
from training.errors import ModelLoadError
from training.model.tiny_names import ARCHITECTURES, SCHEME

log = logging.getLogger(__name__)

SEED = 0
VOCAB_SIZE = 2048
# Wider than transformers' default of 0.02: with frozen random norms and output head, a
# 128-wide model at 0.02 cannot produce logits much above 1, so no LoRA could lower the
# loss far below ln(vocab). At 0.1 a short QLoRA run visibly learns.
INIT_SCALE = 0.1
QWEN_TEMPLATE = Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"
# Qwen2.5's tokens for its chat turns (special) and its tool calls (added, not special: the calls are
# text that the answer shows).
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")
LLAMA3_TEMPLATE = Path(trl.__file__).parent / "chat_templates" / "llama3_1.jinja"
# Llama 3.1's special tokens, by the names its tokenizer gives them; the pad token is one of its
# reserved ones, as Llama 3.1 fine-tunes commonly pad.
LLAMA3_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)


def tiny_dir() -> Path:
    return Path(os.environ.get("QLORA_TINY_DIR", "outputs/tiny-models"))


def default_data_dir() -> Path:
    here = Path("data")
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "data"


def resolve_model_name(name: str) -> str:
    """Map tiny://ARCH to its directory, building it if needed; other names pass through."""
    if not name.startswith(SCHEME):
        return name
    arch = name.removeprefix(SCHEME)
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"unknown tiny model {name!r}; available: {', '.join(SCHEME + a for a in ARCHITECTURES)}"
        )
    return str(ensure_tiny_model(arch))


def ensure_tiny_model(arch: str, out_dir: Path | None = None, data_dir: Path | None = None) -> Path:
    target = (out_dir or tiny_dir()) / arch
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{arch}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same model
        if not (target / "config.json").is_file():
            build_tiny_model(arch, target, data_dir or default_data_dir())
    return target


def build_tiny_model(arch: str, target: Path, data_dir: Path) -> None:

    log.info("Building tiny model %s in %s (tokenizer trained on %s)", arch, target, data_dir)
    train_tokenizer_for, build_model = _BUILDERS[arch]
    tokenizer = train_tokenizer_for(data_dir)
    torch.manual_seed(SEED)
    model = build_model(tokenizer)
    with building_dir(target, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(tmp)


def _shape(tokenizer) -> dict:
    """What every tiny model shares: two layers of two heads of 64 (a head size every serving
    engine's kernels take), the tokenizer's vocabulary and special tokens, and INIT_SCALE."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": INIT_SCALE,
    }


def _llama(tokenizer, *, tied: bool):
    config = LlamaConfig(
        **_shape(tokenizer), intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=tied
    )
    return LlamaForCausalLM(config)


def _llama3(tokenizer):
    config = LlamaConfig(
        **_shape(tokenizer),
        intermediate_size=256,
        num_key_value_heads=1,  # grouped-query attention, as every Llama 3 model has
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _gpt_neox(tokenizer):
    config = GPTNeoXConfig(
        **_shape(tokenizer),
        intermediate_size=512,
        rotary_pct=0.5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config)


def _qwen2(tokenizer):
    config = Qwen2Config(
        **_shape(tokenizer),
        intermediate_size=256,
        num_key_value_heads=1,  # grouped-query attention, as every Qwen2.5 model has
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


# The shipped datasets the tokenizers are trained on: named, not globbed, so that a new sample file
# leaves the tiny models (and every figure measured on them) as they were. tool_calls.jsonl came
# later, with tiny://qwen2, whose tokenizer reads it too, as tiny://llama3's does.
CORPUS = ("chat_messages.jsonl", "en_quotes.jsonl", "ja_dolly.jsonl", "ko_usr_bot.jsonl")
TOOL_CORPUS = (*CORPUS, "tool_calls.jsonl")


def corpus(data_dir: Path, files: tuple[str, ...] = CORPUS) -> Iterator[str]:
    """Every string in the shipped datasets, plus the built-in templates' markers."""
    missing = [name for name in files if not (data_dir / name).is_file()]
    if missing:
        raise ModelLoadError(f"{data_dir}: no {', '.join(missing)} to train the tiny tokenizer on")
    for path in (data_dir / name for name in files):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield from _strings(json.loads(line))
    for template in BUILTIN_TEMPLATES.values():
        yield from (s for s in vars(template).values() if isinstance(s, str))


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def train_qwen_tokenizer(data_dir: Path):
    """Qwen2.5-Instruct's layout: ChatML's special tokens (<|im_end|> ends a turn and is EOS, as in
    Qwen's generation_config), no BOS, the tool-call tags as added tokens, and its chat template. The
    template's own text is in the BPE corpus, so that its system and tools preambles take few tokens."""
    template = QWEN_TEMPLATE.read_text(encoding="utf-8")
    tk = _bpe(itertools.chain(corpus(data_dir, TOOL_CORPUS), [template]), list(CHATML_TOKENS))
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
    )
    tokenizer.add_tokens(list(TOOL_CALL_TOKENS))
    tokenizer.chat_template = template
    return tokenizer


def train_llama3_tokenizer(data_dir: Path):
    """Llama-3.1-Instruct's layout: its header, end-of-turn and tool tokens (special), <|eot_id|> as
    EOS (what ends an answer, as in its tokenizer_config), BOS added in front of plain text and
    written by the chat template itself, and its chat template, whose text is in the BPE corpus."""
    template = LLAMA3_TEMPLATE.read_text(encoding="utf-8")
    tk = _bpe(itertools.chain(corpus(data_dir, TOOL_CORPUS), [template]), list(LLAMA3_TOKENS))
    bos = LLAMA3_TOKENS[0]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        additional_special_tokens=[
            t for t in LLAMA3_TOKENS if t not in (bos, "<|eot_id|>", "<|finetune_right_pad_id|>")
        ],
        model_max_length=2048,
    )
    tokenizer.chat_template = template
    return tokenizer


def _bpe(texts: Iterator[str], special_tokens: list[str]) -> Tokenizer:
    tk = Tokenizer(models.BPE(unk_token=special_tokens[0]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return tk


def train_tokenizer(data_dir: Path, *, neox: bool):

    if neox:  # GPT-NeoX (Polyglot-ko, OpenCALM): one <|endoftext|> for BOS/EOS, no BOS added
        specials = {
            "bos": "<|endoftext|>",
            "eos": "<|endoftext|>",
            "unk": "<|endoftext|>",
            "pad": "<|padding|>",
        }
    else:  # Llama: BOS added in front of every text
        specials = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>"}
    special_list = list(dict.fromkeys([specials["unk"], specials["bos"], specials["eos"], specials["pad"]]))

    tk = _bpe(corpus(data_dir), special_list)
    if not neox:
        bos_id = tk.token_to_id(specials["bos"])
        tk.post_processor = processors.TemplateProcessing(
            single=f"{specials['bos']} $A",
            pair=f"{specials['bos']} $A {specials['bos']} $B",
            special_tokens=[(specials["bos"], bos_id)],
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        unk_token=specials["unk"],
        pad_token=specials["pad"],
        model_max_length=2048,
    )


# Each architecture's tokenizer (trained on the data folder) and model (built on that tokenizer).
_BUILDERS = {
    "llama": (partial(train_tokenizer, neox=False), partial(_llama, tied=False)),
    "llama-tied": (partial(train_tokenizer, neox=False), partial(_llama, tied=True)),
    "gpt-neox": (partial(train_tokenizer, neox=True), _gpt_neox),
    "qwen2": (train_qwen_tokenizer, _qwen2),
    "llama3": (train_llama3_tokenizer, _llama3),
}
