"""Paged attention in plain PyTorch (CPU and CUDA): scaled_dot_product_attention over K/V
gathered from the block table.

Decodes run as one batched SDPA with the GQA group folded into the query axis. Prefills are
padded to the longest query of the step; when no prefill has cached context (the common case)
the step's own K/V are used directly with a causal mask, otherwise K/V are gathered from the
cache and masked explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fleetlm.attention.base import AttentionBackend, BatchLayout


@dataclass
class TorchPagedMetadata:
    slot_mapping: torch.Tensor
    num_decode_tokens: int
    decode_block_table: torch.Tensor | None  # [Bd, nb]
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, nb*bs] additive (0 or -inf)
    decode_seq_lens: torch.Tensor | None  # [Bd] int64
    num_prefills: int
    prefill_max_q: int
    prefill_pad_index: torch.Tensor | None  # [Tp] position of each prefill token in [Bp*max_q]
    prefill_block_table: torch.Tensor | None  # [Bp, nb] (only when some prefill has context)
    prefill_mask: torch.Tensor | None  # [Bp, 1, max_q, max_kv] additive; None = plain causal
    prefill_uniform: bool  # every prefill has the same query length: no padding needed


class TorchPagedBackend(AttentionBackend):
    name = "torch_paged"

    def __init__(self, block_size: int, dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.dtype = dtype

    def _additive(self, allowed: np.ndarray, device: torch.device) -> torch.Tensor:
        """Bool 'may attend' -> additive mask in the model dtype, built once per step (SDPA
        would otherwise convert a bool mask in every layer)."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(torch.from_numpy(~allowed), float("-inf"))
        return mask.to(device)

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TorchPagedMetadata:
        nd = layout.num_decodes
        dec_bt, dec_mask = self._decode_metadata(layout, device) if nd else (None, None)
        dec_lens = torch.from_numpy(layout.seq_lens[:nd]).to(device) if nd else None
        q_lens, ctx = layout.query_lens[nd:], layout.context_lens[nd:]
        num_p, bs = len(q_lens), self.block_size
        pad_index = p_bt = p_mask = None
        max_q = int(q_lens.max()) if num_p else 0
        if num_p:
            rows = np.repeat(np.arange(num_p), q_lens)
            starts = np.repeat(np.cumsum(q_lens) - q_lens, q_lens)
            within = np.arange(int(q_lens.sum())) - starts
            pad_index = torch.from_numpy(rows * max_q + within).to(device)
            if ctx.any():
                kv_lens = ctx + q_lens
                nb = int(-(-kv_lens.max() // bs))
                p_bt = torch.from_numpy(layout.block_table[nd:, :nb]).to(device)
                j = np.arange(nb * bs)[None, None, :]
                i = np.arange(max_q)[None, :, None]
                mask = (j <= ctx[:, None, None] + i) & (j < kv_lens[:, None, None])
                p_mask = self._additive(mask, device)[:, None]
        uniform = bool(num_p) and bool((q_lens == max_q).all())
        return TorchPagedMetadata(layout.slot_mapping.to(device), nd, dec_bt, dec_mask, dec_lens,
                                  num_p, max_q, pad_index, p_bt, p_mask, uniform)

    def _decode_metadata(self, layout: BatchLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block table cut to the longest decode, and its additive padding mask."""
        nd, bs = layout.num_decodes, self.block_size
        seq_lens = layout.seq_lens[:nd]
        nb = int(-(-seq_lens.max() // bs))
        table = torch.from_numpy(layout.block_table[:nd, :nb]).to(device)
        cols = np.arange(nb * bs)
        return table, self._additive(cols[None, :] < seq_lens[:, None], device)[:, None, None, :]

    def forward(self, q, k, v, kv_cache, meta: TorchPagedMetadata) -> torch.Tensor:
        num_kv, d = k.shape[1], k.shape[2]
        kv_cache[0].view(-1, num_kv, d).index_copy_(0, meta.slot_mapping, k)
        kv_cache[1].view(-1, num_kv, d).index_copy_(0, meta.slot_mapping, v)
        nd = meta.num_decode_tokens
        parts = []
        if nd:
            parts.append(self._decode(q[:nd], kv_cache, meta))
        if meta.num_prefills:
            parts.append(self._prefill(q[nd:], k[nd:], v[nd:], kv_cache, meta))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _gather(kv_cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of each row's blocks in one index op: two [B, Hkv, L, D] views."""
        b, nb = block_table.shape
        _, _, bs, h, d = kv_cache.shape
        kv = kv_cache[:, block_table].view(2, b, nb * bs, h, d).transpose(2, 3)
        return kv[0], kv[1]

    def _decode(self, q, kv_cache, meta) -> torch.Tensor:
        bd, h, d = q.shape
        num_kv = kv_cache.shape[3]
        qg = q.view(bd, num_kv, h // num_kv, d)  # GQA group as query rows
        kk, vv = self._gather(kv_cache, meta.decode_block_table)
        out = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=meta.decode_mask)
        return out.reshape(bd, h, d)

    def _prefill(self, q, k, v, kv_cache, meta) -> torch.Tensor:
        bp, max_q = meta.num_prefills, meta.prefill_max_q
        h, d = q.shape[1], q.shape[2]
        if bp == 1 and meta.prefill_mask is None:
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                is_causal=True, enable_gqa=True)
            return out[0].transpose(0, 1)
        pad = (lambda x: x) if meta.prefill_uniform else (lambda x: self._pad(x, meta, bp * max_q))
        qp = pad(q).view(bp, max_q, h, d).transpose(1, 2)
        if meta.prefill_mask is None:
            kp = pad(k).view(bp, max_q, -1, d).transpose(1, 2)
            vp = pad(v).view(bp, max_q, -1, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
        else:
            kp, vp = self._gather(kv_cache, meta.prefill_block_table)
            out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=meta.prefill_mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(bp * max_q, h, d)
        return out if meta.prefill_uniform else out.index_select(0, meta.prefill_pad_index)

    @staticmethod
    def _pad(x: torch.Tensor, meta: TorchPagedMetadata, rows: int) -> torch.Tensor:
        out = x.new_zeros((rows, *x.shape[1:]))
        return out.index_copy_(0, meta.prefill_pad_index, x)
