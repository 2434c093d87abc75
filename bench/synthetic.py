"""Models and data for GPU benchmarks, built on the spot: no download, same on every machine.

    python bench/synthetic.py model --shape llama-7b --out outputs/bench/llama-7b
    python bench/synthetic.py data --out outputs/bench/varlen.jsonl --rows 2000 --max-tokens 2048

`model` writes a Llama-shaped model with random weights (bf16 safetensors) in the shape of a
real checkpoint, with the tiny Llama's tokenizer. The tokenizer knows 2,048 tokens while the
model keeps the real 32,000-row embedding and output head, so every matmul, the logits and
the loss have the real model's sizes; only the ids used stay below 2,048.

`data` writes instruction rows (dolly-ja format) whose rendered length spreads from
--min-tokens to --max-tokens, log-uniformly, the way instruction data does: many short rows,
a few long ones. That is the mix where padding, packing and padding-free batches differ.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# hidden, intermediate, layers, attention heads, key/value heads
SHAPES = {
    "llama-1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B
    "llama-7b": (4096, 11008, 32, 32, 32),  # Llama-2-7B
    "llama-13b": (5120, 13824, 40, 40, 40),  # Llama-2-13B
    "llama-smoke": (256, 688, 2, 4, 4),  # a few MB: checks the script itself
}


def random_llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int):
    """A Llama with random weights in bf16, speaking the tiny Llama tokenizer's special ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.model.tiny import ensure_tiny_model

    tiny_config = json.loads((ensure_tiny_model("llama") / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        # So that generation stops where the tokenizer says.
        **{k: tiny_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    torch.manual_seed(0)
    # Initialised in bf16 (a 7B model in float32 would need 28 GB first), where it is
    # fastest: a 7B model takes minutes on a CPU, seconds on a GPU.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def build_model(shape: str, out: Path) -> None:
    from transformers import GenerationConfig

    from training.atomic import building_dir
    from training.model.tiny import ensure_tiny_model

    model = random_llama(*SHAPES[shape])
    config, tokenizer_src = model.config, ensure_tiny_model("llama")
    params = sum(p.numel() for p in model.parameters())
    with building_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp, max_shard_size="5GB")
        GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        ).save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_src / name).is_file():
                shutil.copy(tokenizer_src / name, tmp / name)
    print(f"{shape}: {params / 1e9:.2f}B parameters -> {out}")


def build_data(out: Path, rows: int, min_tokens: int, max_tokens: int, seed: int) -> None:
    from transformers import AutoTokenizer

    from training.atomic import write_text
    from training.model.tiny import ensure_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model("llama"))
    source = [
        json.loads(line) for line in (ROOT / "data" / "ja_dolly.jsonl").read_text().splitlines() if line
    ]
    pieces = [r["output"] for r in source if r.get("output")]
    piece_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pieces]
    rng = random.Random(seed)
    lines, lengths = [], []
    for _ in range(rows):
        target = math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens)))
        row = rng.choice(source)
        body, count = [], len(tokenizer(row["instruction"], add_special_tokens=False)["input_ids"]) + 8
        while count < target:
            i = rng.randrange(len(pieces))
            body.append(pieces[i])
            count += piece_tokens[i] + 1
        lines.append(
            json.dumps(
                {"instruction": row["instruction"], "input": "", "output": "\n".join(body)},
                ensure_ascii=False,
            )
        )
        lengths.append(count)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "\n".join(lines) + "\n")
    lengths.sort()
    print(
        f"{rows} rows -> {out}; about {sum(lengths)} tokens, median {lengths[rows // 2]}, "
        f"max {lengths[-1]} (before truncation)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="a Llama-shaped model with random weights")
    m.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    m.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("data", help="instruction rows of spread-out lengths")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--rows", type=int, default=2000)
    d.add_argument("--min-tokens", type=int, default=64)
    d.add_argument("--max-tokens", type=int, default=2048)
    d.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.what == "model":
        build_model(args.shape, args.out)
    else:
        build_data(args.out, args.rows, args.min_tokens, args.max_tokens, args.seed)


if __name__ == "__main__":
    main()
