"""Tokenizer, data, 4-bit model and SFTTrainer for a recipe, as a run trains them."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from training.data.prepare import PreparedData, prepare_data
from training.model.loading import load_model, load_tokenizer
from training.model.lora import lora_config
from training.model.varlen_attention import NAME as VARLEN_ATTENTION
from training.model.varlen_attention import enable_varlen_attention
from training.recipe import Recipe
from training.train.device_defaults import apply_model_defaults, apply_trainer_defaults
from training.train.distributed import ranks, shards_weights
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
    if (recipe.data.packing or sft_args.padding_free) and enable_varlen_attention(model):
        log.info(
            "Padding-free batches: attention within each example (%s), no mask over the batch",
            VARLEN_ATTENTION,
        )
    apply_model_defaults(recipe, model.config, sft_args, device)
    with warnings.catch_warnings():
        # TRL 1.16 points use_liger_kernel users to the Hub's kernels, which need the Hub when the
        # run starts; the pinned TRL keeps Liger, and runs offline need it.
        warnings.filterwarnings(
            "ignore", message="`use_liger_kernel=True` is deprecated", category=FutureWarning
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
    apply_trainer_defaults(trainer, device)
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
