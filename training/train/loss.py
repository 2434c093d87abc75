"""TRL's SFTTrainer with a plain loss head on the CPU: the same loss, a fraction of the work.

TRL scores tokens through its chunked LM head (trl.kernels.chunked_logprob): it projects only
the positions whose next token has a label, never materialises the full logits, and computes
each token's entropy and top-1 hit for the logs. On GPUs a Triton kernel does that in tiles.
On the CPU it falls back to about a dozen torch passes over a [tokens, 32768] tile in each
direction, whatever the vocabulary: on the quickstart's tiny model that was the largest part of
a step (bench/train_throughput.py, BENCHMARKS.md).

On the CPU this trainer computes the same thing the direct way: the model projects only the
scored hidden states (a pre-hook on the output head selects them), then the negative
log-likelihood of the labels under their softmax, summed and divided by `num_items_in_batch`, as
TRL does. Same loss, same gradients; the entropy and accuracy metrics from the same logits.
Everything else (GPUs, label smoothing, DFT, custom loss functions, MoE aux losses, context
parallelism) goes to TRL unchanged.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

IGNORE_INDEX = -100
_METRIC_ROWS = 64


class _SummedNLL(torch.autograd.Function):
    """The summed negative log-likelihood of `targets` under softmax(`logits`), as log_softmax + nll_loss.

    Its backward keeps the logits and a log-sum-exp per row, and makes one [tokens, vocab] tensor
    (softmax minus the one-hot targets, in place); log_softmax + nll_loss keep the log-probabilities
    and make two more of that size, at the moment every layer's activations are still held.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - logits.gather(1, targets.unsqueeze(1)).squeeze(1)).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        probs = (logits - lse.unsqueeze(1)).exp_()
        probs[torch.arange(targets.numel(), device=targets.device), targets] -= 1
        return probs.mul_(grad), None


class QLoRASFTTrainer(SFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._plain_loss_applies(inputs, return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        targets = inputs.pop("labels")[:, 1:]
        # Positions whose next token counts toward the loss; the last position predicts nothing.
        scored = torch.nn.functional.pad(targets != IGNORE_INDEX, (0, 1))
        targets = targets[targets != IGNORE_INDEX]
        inputs["use_cache"] = False
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        # Through DDP and peft the model runs its own forward; the head sees only the scored states.
        hook = head.register_forward_pre_hook(lambda _module, args: (args[0][scored],))
        try:
            logits = model(**inputs).logits
        finally:
            hook.remove()
        logits = logits.float()
        count = targets.numel() if num_items_in_batch is None else num_items_in_batch
        loss = _SummedNLL.apply(logits, targets)
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients, as in TRL.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._log_token_metrics(mode, logits.detach(), targets, inputs)
        return loss

    def _plain_loss_applies(self, inputs, return_outputs: bool) -> bool:
        return (
            self.args.device.type == "cpu"
            and not return_outputs
            and self.args.loss_type == "nll"
            and self.label_smoother is None
            and self.compute_loss_func is None
            and not self.aux_loss_enabled
            and "labels" in inputs
            and "shift_labels" not in inputs  # pre-shifted labels: sequence parallelism, TRL's path
        )

    def _log_token_metrics(self, mode: str, logits, targets, inputs) -> None:
        """The metrics TRL's head logs: entropy, mean token accuracy, and tokens seen in training."""
        gather = self.accelerator.gather_for_metrics
        with torch.no_grad():
            valid = gather(torch.as_tensor(targets.numel(), device=targets.device)).sum()
            # A slice of rows at a time: a whole [tokens, vocab] matrix more would be the step's peak.
            entropy = torch.zeros((), device=logits.device)
            for rows in logits.split(_METRIC_ROWS):
                log_probs = torch.log_softmax(rows, dim=-1)
                entropy -= (log_probs.exp() * log_probs).sum()
            entropy = gather(entropy).sum()
            correct = gather((logits.argmax(dim=-1) == targets).sum()).sum()
        self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free batches: one row of packed tokens
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += gather(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
