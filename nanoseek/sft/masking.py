"""Document-causal attention for packed SFT rows, installed from outside the model.

A packed row holds several documents one after another. Plain causal attention would let a token
attend to the documents before it in the row; document-causal attention allows query i to see key j
only when j <= i and both lie in the same document:

    allowed[b, i, j] = (doc[b, i] == doc[b, j]) & (j <= i)            (B, S, S) boolean
    out = softmax(q k^T * scale + (0 where allowed else -inf)) v       SDPA's attn_mask

With positions restarting at 0 in every document (RoPE), each document then computes exactly what it
would compute alone in a row (`tests/test_sft.py` checks the per-document losses).

Two implementations of the same masked attention (`DocumentMask(kind)`):
    "sdpa"  the reference: the dense (B, 1, S, S) boolean mask through SDPA (every score computed)
    "flex"  FlexAttention with a block mask built from the same rule: blocks that hold no allowed pair
            are skipped (compiled on CUDA, eager elsewhere: the CPU runs it only to test it)
`tests/test_sft.py` checks that they agree.

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

KINDS = ("sdpa", "flex")
_compiled_flex = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float) -> torch.Tensor:
    """FlexAttention (B, H, S, Dqk), (B, H, S, Dqk), (B, H, S, Dv) -> (B, H, S, Dv); compiled once on CUDA."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)


class DocumentMask:
    """The mask of the batch being run, shared by every DocumentMLA: `allowed` (B, 1, S, S) boolean for
    "sdpa", `block_mask` (FlexAttention's BlockMask) for "flex"."""

    def __init__(self, kind: str = "sdpa") -> None:
        if kind not in KINDS:
            raise ValueError(f"document attention {kind!r} is unknown; use one of {KINDS}")
        self.kind = kind
        self.allowed: torch.Tensor | None = None
        self.block_mask = None

    def set(self, doc_ids: torch.Tensor | None) -> None:
        """doc_ids (B, S): document index of each position (any value on padding), or None (causal).

        Kept until the next call: activation checkpointing recomputes the forward in backward and must
        see the same mask."""
        self.allowed, self.block_mask = None, None
        if doc_ids is None:
            return
        B, S = doc_ids.shape
        if self.kind == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            def same_document_causal(b, h, q, kv):
                return (doc_ids[b, q] == doc_ids[b, kv]) & (kv <= q)

            self.block_mask = create_block_mask(same_document_causal, B, None, S, S, device=doc_ids.device)
            return
        causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
        self.allowed = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]  # (B, 1, S, S)

    @property
    def active(self) -> bool:
        return self.allowed is not None or self.block_mask is not None


class DocumentMLA(MLA):
    """MLA whose expanded (training) attention honours the shared DocumentMask."""

    doc_mask: DocumentMask

    def expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                 k_pe: torch.Tensor) -> torch.Tensor:
        mask = self.doc_mask
        if not mask.active:
            return super().expanded(q_nope, q_pe, c_kv, k_pe)
        B, S, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # (B, H, S, N + P)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # (B, H, S, V)
        if mask.block_mask is not None:  # not an autocast op: give it autocast's dtype, as SDPA gets
            dt = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
            out = flex(q.to(dt), k.to(dt), v.to(dt), mask.block_mask, self.scale)
        else:
            if mask.allowed.shape[-1] != S:
                raise ValueError(f"document mask is for {mask.allowed.shape[-1]} positions, the batch has {S}")
            with _sdpa_backends(q.device):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, scale=self.scale)
        return out.transpose(1, 2).reshape(B, S, H * self.v_dim)  # (B, S, H * V)


def install_document_masking(model: nn.Module, kind: str = "sdpa") -> DocumentMask:
    """Swap every MLA of `model` (main layers and MTP modules) for a DocumentMLA sharing one mask of
    `kind` ("sdpa" or "flex"); return the mask. Installing again returns the mask in place."""
    existing = [m.doc_mask for m in model.modules() if isinstance(m, DocumentMLA)]
    if existing:
        if existing[0].kind != kind:
            raise ValueError(f"document masking is installed with {existing[0].kind!r}, not {kind!r}")
        return existing[0]
    mask = DocumentMask(kind)

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        if type(module) is MLA:
            new = adopt(DocumentMLA, module)
            new.doc_mask = mask
            return new
        return None

    replace_modules(model, swap)
    return mask
