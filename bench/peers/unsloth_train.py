"""Unsloth's QLoRA as its notebooks run it, with the bench's throughput callback (in Unsloth's venv).

FastLanguageModel loads the model in 4 bits and patches it with Unsloth's kernels (on a machine
without a GPU, Unsloth's own CPU path),
FastLanguageModel.get_peft_model adds the LoRA layers (with Unsloth's own activation
checkpointing where the recipe checkpoints), and TRL's SFTTrainer trains, as Unsloth documents.
The rows are the bench's rendered prompt/response pairs, tokenized here without added special
tokens (the other peers tokenize them the same way) into input_ids and a completion_mask: TRL
trains on exactly this stack's tokens, with the loss on the responses.

    python unsloth_train.py CONFIG   # CONFIG: {"settings": settings.json's, "data_dir": ..., "out_dir": ...}
"""

import json
import sys
from pathlib import Path

from unsloth import FastLanguageModel  # first: Unsloth patches transformers, peft and TRL on import

# isort: split
import torch
from datasets import Dataset
from throughput_callback import PeerThroughput
from trl import SFTConfig, SFTTrainer

config = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
s, data_dir, out_dir = config["settings"], Path(config["data_dir"]), Path(config["out_dir"])

checkpointing = "unsloth" if s["activation_checkpointing"] else False  # Unsloth's own, offloading to RAM
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=s["model_dir"],
    max_seq_length=s["max_length"],
    dtype=getattr(torch, s["dtype"]),
    load_in_4bit=True,
    use_gradient_checkpointing=checkpointing,
)
model = FastLanguageModel.get_peft_model(
    model,
    r=s["lora_r"],
    lora_alpha=s["lora_alpha"],
    lora_dropout=s["lora_dropout"],
    target_modules=s["lora_targets"],
    bias="none",
    use_gradient_checkpointing=checkpointing,
    random_state=42,
)

rows = []
for line in (data_dir / "rendered.jsonl").read_text(encoding="utf-8").splitlines():
    pair = json.loads(line)
    prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
    response = tokenizer(pair["response"], add_special_tokens=False)["input_ids"]
    rows.append({"input_ids": prompt + response, "completion_mask": [0] * len(prompt) + [1] * len(response)})

args = SFTConfig(
    output_dir=str(out_dir),
    per_device_train_batch_size=s["batch"],
    gradient_accumulation_steps=1,
    max_steps=s["steps"],
    learning_rate=s["learning_rate"],
    lr_scheduler_type=s["lr_scheduler_type"],
    warmup_steps=s["warmup_steps"],
    optim="adamw_torch",  # as the other peers run (Unsloth's notebooks use adamw_8bit)
    weight_decay=0.0,
    bf16=s["dtype"] == "bfloat16",
    fp16=s["dtype"] == "float16",
    max_length=s["max_length"],
    packing=False,
    completion_only_loss=True,
    dataloader_num_workers=0,
    save_strategy="no",
    logging_steps=100000,
    report_to="none",
    seed=42,
)
trainer = SFTTrainer(
    model=model,
    args=args,
    train_dataset=Dataset.from_list(rows),
    processing_class=tokenizer,
    callbacks=[PeerThroughput()],
)
trainer.train()
