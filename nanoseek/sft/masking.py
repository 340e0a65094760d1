"""Document-causal attention for packed SFT rows, installed from outside the model.

A packed row holds several documents one after another. Plain causal attention would let a token
attend to the documents before it in the row; document-causal attention allows query i to see key j
only when j <= i and both lie in the same document:

    allowed[b, i, j] = (doc[b, i] == doc[b, j]) & (j <= i)            (B, S, S) boolean
    out = softmax(q k^T * scale + (0 where allowed else -inf)) v       SDPA's attn_mask

With positions restarting at 0 in every document (RoPE), each document then computes exactly what it
would compute alone in a row (`tests/test_sft.py` checks the per-document losses).

The model's MLA takes no mask (its expanded path is causal SDPA), so `install_document_masking`
swaps every MLA for `DocumentMLA` (model/swap.py: same parameters, same state_dict keys), whose
expanded path reads the current mask from a `DocumentMask` shared by all layers. A swapped model with
no mask set (`mask.set(None)`) computes plain causal attention, bit for bit the reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.mla import MLA, _sdpa_backends
from nanoseek.model.swap import adopt, replace_modules


class DocumentMask:
    """The boolean (B, 1, S, S) mask of the batch being run, shared by every DocumentMLA."""

    def __init__(self) -> None:
        self.allowed: torch.Tensor | None = None

    def set(self, doc_ids: torch.Tensor | None) -> None:
        """doc_ids (B, S): document index of each position (any value on padding), or None (causal).

        Kept until the next call: activation checkpointing recomputes the forward in backward and must
        see the same mask."""
        if doc_ids is None:
            self.allowed = None
            return
        S = doc_ids.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
        self.allowed = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]  # (B, 1, S, S)


class DocumentMLA(MLA):
    """MLA whose expanded (training) attention honours the shared DocumentMask."""

    doc_mask: DocumentMask

    def expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                 k_pe: torch.Tensor) -> torch.Tensor:
        allowed = self.doc_mask.allowed
        if allowed is None:
            return super().expanded(q_nope, q_pe, c_kv, k_pe)
        B, S, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # (B, H, S, N + P)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope)), dim=-1).transpose(1, 2)
        if allowed.shape[-1] != S:
            raise ValueError(f"document mask is for {allowed.shape[-1]} positions, the batch has {S}")
        with _sdpa_backends(q.device):
            out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=allowed, scale=self.scale)
        return out.transpose(1, 2).reshape(B, S, H * self.v_dim)  # (B, S, H * V)


def install_document_masking(model: nn.Module) -> DocumentMask:
    """Swap every MLA of `model` (main layers and MTP modules) for a DocumentMLA sharing one mask;
    return the mask. Installing twice returns the mask already in place."""
    existing = [m.doc_mask for m in model.modules() if isinstance(m, DocumentMLA)]
    if existing:
        return existing[0]
    mask = DocumentMask()

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        if type(module) is MLA:
            new = adopt(DocumentMLA, module)
            new.doc_mask = mask
            return new
        return None

    replace_modules(model, swap)
    return mask
