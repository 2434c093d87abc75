"""The CPU defaults: the plain loss head gives TRL's loss and gradients, and the per-hardware settings."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig
from trl import SFTTrainer

from training.model.loading import Device, compute_dtype, detect_device
from training.model.lora_dropout import DroppedLinear
from training.model.tiny import resolve_model_name
from training.recipe import load_recipe
from training.train.builder import build_trainer
from training.train.estimate import activation_checkpointing_default, load_config
from training.train.loss import QLoRASFTTrainer
from training.train.sft_config import build_sft_config, sft_kwargs

QUICK = "recipes/quickstart.yaml"
CPU = Device("cpu", "cpu", 1, False)
CUDA = Device("cuda", "GPU", 1, True)


@pytest.fixture(scope="module")
def trainer(tiny_dir, tmp_path_factory):
    # No dropout, so that two forward passes of the same batch are the same computation.
    overrides = [f"output.dir={tmp_path_factory.mktemp('loss')}", "lora.dropout=0", "data.validation=null"]
    recipe = load_recipe(QUICK, overrides)
    device = detect_device()
    dtype = compute_dtype(recipe.model.dtype, device)
    args = build_sft_config(recipe, device, "float32", QUICK)
    built = build_trainer(recipe, args, device, dtype).trainer
    assert isinstance(built, QLoRASFTTrainer)
    return built


def loss_and_grads(trainer, compute_loss, batch, num_items):
    trainer.model.zero_grad()
    loss = compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def test_plain_cpu_loss_head_matches_trls_loss_gradients_and_metrics(trainer):
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    scored = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < scored < batch["input_ids"].numel()  # prompts and padding are masked out
    num_items = torch.tensor(scored + 17)  # as under gradient accumulation: tokens of all micro-batches

    ours = loss_and_grads(trainer, QLoRASFTTrainer.compute_loss, batch, num_items)
    tokens_after_ours = trainer._total_train_tokens
    trl = loss_and_grads(trainer, SFTTrainer.compute_loss, batch, num_items)

    assert ours[0].item() == pytest.approx(trl[0].item(), rel=1e-5)
    assert ours[1].keys() == trl[1].keys() and len(ours[1]) > 0
    for name, grad in ours[1].items():
        torch.testing.assert_close(grad, trl[1][name], rtol=1e-4, atol=1e-7, msg=name)
    for metric in ("entropy", "mean_token_accuracy"):
        assert ours[2][metric] == pytest.approx(trl[2][metric], rel=1e-4, abs=1e-6), metric
    # Each path counted the batch's non-padding tokens once.
    assert trainer._total_train_tokens - tokens_after_ours == int(batch["attention_mask"].sum())


def test_batches_group_rows_by_length_on_every_device_unless_the_recipe_says():
    recipe = load_recipe(QUICK)
    assert sft_kwargs(recipe, CPU, "float32")["train_sampling_strategy"] == "group_by_length"
    assert sft_kwargs(recipe, CUDA, "bfloat16")["train_sampling_strategy"] == "group_by_length"
    chosen = load_recipe(QUICK, ["training.train_sampling_strategy=random"])
    assert sft_kwargs(chosen, CPU, "float32")["train_sampling_strategy"] == "random"


def test_cpu_checkpointing_is_off_where_memory_allows_unless_the_recipe_says(tiny_dir):
    config = AutoConfig.from_pretrained(resolve_model_name("tiny://llama"))
    assert activation_checkpointing_default(load_recipe(QUICK), config) is False
    on = load_recipe(QUICK, ["training.activation_checkpointing=true"])
    assert activation_checkpointing_default(on, config) is True
    # A 7B model's activations at the seed recipe's batch and length need it.
    long_rows = load_recipe(QUICK, ["data.max_length=4096", "training.per_device_train_batch_size=16"])
    big = load_config(long_rows, "bench/configs/llama-2-7b.json")
    assert activation_checkpointing_default(long_rows, big) is True


def test_cpu_trainer_fuses_lora_dropout_into_lora_a(tiny_dir, tmp_path):
    recipe = load_recipe(QUICK, [f"output.dir={tmp_path}", "data.validation=null"])
    assert recipe.lora.dropout > 0
    device = detect_device()
    args = build_sft_config(recipe, device, "float32", QUICK)
    model = build_trainer(recipe, args, device, compute_dtype(recipe.model.dtype, device)).trainer.model
    fused = [m for m in model.modules() if isinstance(m, DroppedLinear)]
    assert len(fused) == 14 and {m.dropout_p for m in fused} == {recipe.lora.dropout}  # 7 targets x 2 layers
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
