"""The latent KV cache of MLA: per token and layer only c_kv (kv_lora_rank) and the roped k_pe.

Layout: one tensor (L, B, T_max, R + P) where L counts the main layers plus the MTP layers,
B the batch rows (requests), T_max the positions. Row b's token at position p lives at
`[:, b, p]`. Attention masks keys by position (key position <= query position), so rows of
different lengths share one tensor: stale entries beyond a row's length are never read before
they are overwritten. Rolling a row back (speculative decoding) is just forgetting its length;
the cache itself keeps no lengths, the caller owns them.
"""

from __future__ import annotations

import torch


class LatentCache:
    """Preallocated latent cache for `num_layers` attention layers."""

    def __init__(self, num_layers: int, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.kv_lora_rank, self.rope_dim, self.max_len = kv_lora_rank, rope_dim, max_len
        # (L, B, T_max, R + P)
        self.data = torch.zeros(num_layers, batch_size, max_len, kv_lora_rank + rope_dim,
                                dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.data.shape[1]

    def layer(self, index: int) -> LatentCache:
        """A one-layer view (data (1, B, T_max, R + P)) of layer `index`: writes through it land here. Each
        attention layer reads and writes layer 0 of its own view, so its code carries no layer number: under
        torch.compile every block of a kind shares one graph per shape (views of the same shape differ only
        in storage offset, which dynamo does not guard), instead of one graph per layer."""
        return self._with_data(self.data[index:index + 1])

    def rows(self, hi: int) -> LatentCache:
        """A view of rows [0, hi): writes through it land in this cache."""
        return self._with_data(self.data[:, :hi])

    def gather_rows(self, index: torch.Tensor) -> LatentCache:
        """A new cache whose row i is a copy of row index[i] (n,) of this one."""
        return self._with_data(self.data[:, index])

    def _with_data(self, data: torch.Tensor) -> LatentCache:
        """A cache of this one's shape settings holding `data` (a view of ours, or a copy)."""
        out = object.__new__(LatentCache)
        out.kv_lora_rank, out.rope_dim, out.max_len = self.kv_lora_rank, self.rope_dim, self.max_len
        out.data = data
        return out

    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all cached layers."""
        return self.data.shape[0] * self.data.shape[-1] * self.data.element_size()

    def write(self, layer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store c_kv (B, S, R) and k_pe (B, S, P) at positions (B, S) of the given layer."""
        self.write_entry(layer, positions, torch.cat((c_kv, k_pe), dim=-1))

    def write_entry(self, layer: int, positions: torch.Tensor, entry: torch.Tensor) -> None:
        """Store entry [c_kv ; k_pe] (B, S, R + P) at positions (B, S) of the given layer."""
        entry = entry.to(self.data.dtype)
        B, S = positions.shape
        rows = torch.arange(B, device=positions.device)[:, None].expand(B, S)
        # one index_put_ on the whole tensor (not on a view of it): under torch.compile this stays an
        # in-place write of B*S entries instead of a functional copy of the layer's cache
        self.data.index_put_((torch.full_like(positions, layer), rows, positions), entry)

    def write_rows(self, rows: torch.Tensor, source: LatentCache) -> None:
        """Copy every layer of `source` (a cache of len(rows) rows and at most max_len positions) into
        rows `rows` (n,) of this one: data[:, rows, :T] = source.data. The indexed copy moves entries
        as 8-byte words where their width allows: 4x fewer indexed elements than bf16 entries (a
        batch-32, 512-token prefill of bench-1b copied its 245 MB in 583 us as bf16 on the H200)."""
        src, T = source.data, source.data.shape[2]
        dst = self.data[:, :, :T]
        if dst.dtype == src.dtype and (src.shape[-1] * src.element_size()) % 8 == 0:
            dst, src = dst.view(torch.int64), src.view(torch.int64)
        dst[:, rows] = src

    def read(self, layer: int, length: int) -> torch.Tensor:
        """[c_kv ; k_pe] (B, T, R + P) of the first `length` positions (a view)."""
        return self.data[layer, :, :length]


def check_layer_view(cache: LatentCache) -> None:
    """An attention layer takes its own layer's view of the cache (`cache.layer(i)`; `Transformer.forward`
    hands each block one), never the whole cache."""
    if cache.data.shape[0] != 1:
        raise ValueError(f"an attention layer got a cache of {cache.data.shape[0]} layers; pass its own layer's "
                         "view, cache.layer(i) (Transformer.forward and mtp_forward do)")
