"""Tokenizer, data, 4-bit model and SFTTrainer for a recipe, as a run trains them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from training.data.prepare import PreparedData, prepare_data
from training.model.loading import load_model, load_tokenizer
from training.model.lora import lora_config
from training.model.lora_dropout import fuse_lora_dropout
from training.recipe import Recipe
from training.train.distributed import ranks, shards_weights
from training.train.estimate import cpu_activation_checkpointing
from training.train.loss import QLoRASFTTrainer

log = logging.getLogger(__name__)


@dataclass
class BuiltTrainer:
    trainer: Any
    data: PreparedData
    model_report: dict
    trainable: int
    total: int


def build_trainer(recipe: Recipe, sft_args, device, dtype, *, callbacks=()) -> BuiltTrainer:
    world = ranks()
    tokenizer = load_tokenizer(recipe.model)
    truncates = not (recipe.data.packing and sft_args.packing_strategy in ("bfd_split", "wrapped"))
    data = prepare_data(recipe.data, tokenizer, truncates=truncates)
    log_data(recipe, data)
    tokenizer.chat_template = data.chat_template  # checkpoints and the adapter carry the training format

    model, model_report = load_model(
        recipe.model,
        recipe.quantization,
        device,
        dtype,
        sharded=shards_weights(recipe),
        local_rank=world.local_rank if world.world_size > 1 else None,
    )
    if device.type == "cpu":
        checkpointing = cpu_activation_checkpointing(recipe, model.config)
        # TRL still reads the old name; TrainingArguments mirrors them only when it is built.
        sft_args.activation_checkpointing = sft_args.gradient_checkpointing = checkpointing
        log.info(
            "Activation checkpointing: %s",
            "on"
            if checkpointing
            else "off (the CPU default where memory allows: recomputing costs a third of a step)",
        )
    trainer = QLoRASFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora, model),
        callbacks=list(callbacks),
    )
    if dtype == torch.float32:
        # TRL stores the LoRA weights of a quantized model in bf16, as QLoRA does on GPUs.
        # Computing in float32 (the CPU), that only adds casts and emulated bf16 matmuls.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
    if device.type == "cpu":
        # Same dropout, one byte of mask kept per element instead of two float copies of the input.
        fused = fuse_lora_dropout(trainer.model)
        if fused:
            log.info("LoRA dropout fused into lora_A in %d layers (CPU default)", fused)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info(
        "Trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total
    )
    return BuiltTrainer(trainer, data, model_report, trainable, total)


def log_data(recipe: Recipe, data: PreparedData) -> None:
    cfg = recipe.data
    for name, report in (("train", data.train_report), ("validation", data.eval_report)):
        if report is None:
            continue
        t = report.tokens
        log.info(
            "Data %s: %d rows from %s (%d malformed skipped, %d over max_length, %d dropped with no "
            "response left); %s tokens, %s count toward the loss; longest row %d tokens",
            name,
            t.rows,
            report.source,
            report.rows_skipped_bad,
            t.rows_over_max_length,
            t.rows_dropped_no_loss,
            f"{t.tokens:,}",
            f"{t.loss_tokens:,}",
            t.longest,
        )
    log.info(
        "Effective limits: max_length=%d (longer rows are truncated), packing=%s, loss on %s",
        cfg.max_length,
        "on" if cfg.packing else "off",
        "responses only" if cfg.loss_on_completion_only else "all tokens",
    )
