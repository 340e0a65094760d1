"""The SFT loss: next-token cross-entropy on assistant tokens only, a `loss_fn` for train/step.py.

Batch (nanoseek/sft/data.py): input_ids, targets, positions (B, S) [+ doc_ids (B, S) when packed].

    main   = sum_{targets != IGNORE} CE(logits, targets) / #(targets != IGNORE)     (mean per trained token)
    mtp_k  = the same for MTP depth k (position i predicts targets[i + k]), counted only where i and
             i + k lie in the same document (a packed row's next document is not a target)
    loss   = main + mtp_lambda / D * sum_k mtp_k + seq_aux_alpha * balance

Micro-batches are averaged with equal weight by `accumulate_gradients` (as in pretraining).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.transformer import ModelOutput, Transformer
from nanoseek.sft.data import IGNORE
from nanoseek.sft.masking import DocumentMask
from nanoseek.train.step import LossFn, Metrics


def forward(model: Transformer, batch: dict[str, torch.Tensor], doc_mask: DocumentMask | None,
            mtp: bool) -> ModelOutput:
    """The model on one SFT batch: positions restart per document; packed rows get the document mask."""
    if doc_mask is not None:
        doc_mask.set(batch.get("doc_ids"))
    elif "doc_ids" in batch:
        raise ValueError("a packed batch needs document masking: install_document_masking(model) first")
    mtp_tokens = batch["targets"].clamp_min(0) if mtp and len(model.mtp) else None  # ignored ones: any id
    return model(batch["input_ids"], positions=batch["positions"], mtp_tokens=mtp_tokens)


def mtp_targets(batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Targets (B, S - k) of MTP depth k at positions 0..S-k-1: targets[i + k], IGNORE across documents."""
    y = batch["targets"][:, k:]
    if "doc_ids" in batch:
        doc = batch["doc_ids"]
        y = torch.where(doc[:, k:] == doc[:, :-k], y, IGNORE)
    return y


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position CE (B, S) in fp32, 0 where the target is IGNORE."""
    B, S, V = logits.shape
    return F.cross_entropy(logits.float().reshape(B * S, V), targets.reshape(B * S), ignore_index=IGNORE,
                           reduction="none").view(B, S)


def masked_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over the trained positions (0 for a batch with none: no NaN, no update from it)."""
    count = (targets != IGNORE).sum()
    return token_losses(logits, targets).sum() / count.clamp_min(1)


def sft_loss(doc_mask: DocumentMask | None, mtp_lambda: float, seq_aux_alpha: float, mtp: bool) -> LossFn:
    """The SFT loss_fn(model, batch) -> (loss, metrics: loss, mtp_loss (with mtp), balance, trained)."""

    def loss_fn(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        out = forward(model, batch, doc_mask, mtp)
        main = masked_mean(out.logits, batch["targets"])
        balance = model.balance_loss()
        loss = main + seq_aux_alpha * balance
        metrics = {"loss": main.detach(), "balance": balance.detach(),
                   "trained": (batch["targets"] != IGNORE).sum().float()}
        if out.mtp_logits:
            depths = [masked_mean(lg[:, :-k], mtp_targets(batch, k)) for k, lg in enumerate(out.mtp_logits, start=1)]
            loss = loss + mtp_lambda / len(depths) * torch.stack(depths).sum()
            metrics["mtp_loss"] = depths[0].detach()
        return loss, metrics

    return loss_fn
