"""Paged attention in plain PyTorch (CPU and CUDA): scaled_dot_product_attention over K/V
gathered from the block table.

Decodes run as one batched SDPA with the GQA group folded into the query axis. Prefills of
equal length without cached context (the common bulk case) run as one causal SDPA on the step's
own K/V; otherwise each prefill gets its own SDPA, never padded to a longer neighbour: causal on
its own K/V, or, when it has cached context (a prefix hit or a later chunk), over K/V read from
its blocks with a causal mask offset by the context.
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
    prefill_batched: int  # > 0: every prefill has this query length and no context: one SDPA
    prefill_segments: list[PrefillSegment]  # otherwise: one SDPA per prefill, no padding


@dataclass(frozen=True)
class PrefillSegment:
    start: int  # rows of this request within the step's prefill tokens
    end: int
    block_ids: torch.Tensor | None  # its blocks, when it has cached context to attend to
    kv_len: int
    mask: torch.Tensor | None  # [q, kv_len] additive causal mask offset by the context


class TorchPagedBackend(AttentionBackend):
    name = "torch_paged"

    def __init__(self, block_size: int, dtype: torch.dtype, kv_format=None) -> None:
        self.block_size = block_size
        self.dtype = dtype
        self.kv_format = kv_format  # fleetlm.quantization.kv.KVFormat, or None: the model dtype

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
        num_p = len(q_lens)
        batched = (int(q_lens[0]) if num_p and (q_lens == q_lens[0]).all() and not ctx.any()
                   and layout.tree_masks is None else 0)
        segments = [] if batched or not num_p else self._segments(layout, device)
        return TorchPagedMetadata(layout.slot_mapping.to(device), nd, dec_bt, dec_mask, dec_lens,
                                  num_p, batched, segments)

    def _segments(self, layout: BatchLayout, device: torch.device) -> list[PrefillSegment]:
        nd, bs = layout.num_decodes, self.block_size
        trees = layout.tree_masks[nd:] if layout.tree_masks is not None else [None] * len(layout.query_lens[nd:])
        out, start = [], 0
        for q, c, row, tree in zip(layout.query_lens[nd:], layout.context_lens[nd:], layout.block_table[nd:], trees):
            q, c = int(q), int(c)
            blocks = mask = None
            if c or tree is not None:
                blocks = torch.from_numpy(row[: -(-(c + q) // bs)]).to(device)
                if tree is not None:  # the context, then the query's own rows as the tree allows
                    allowed = np.concatenate([np.ones((q, c), dtype=bool), tree], axis=1)
                    mask = self._additive(allowed, device)
                elif q > 1:
                    allowed = np.arange(c + q)[None, :] <= c + np.arange(q)[:, None]
                    mask = self._additive(allowed, device)
            out.append(PrefillSegment(start, start + q, blocks, c + q, mask))
            start += q
        return out

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
        if self.kv_format is not None:
            self.kv_format.write(kv_cache[0], meta.slot_mapping, k)
            self.kv_format.write(kv_cache[1], meta.slot_mapping, v)
        else:
            kv_cache[0].view(-1, num_kv, d).index_copy_(0, meta.slot_mapping, k)
            kv_cache[1].view(-1, num_kv, d).index_copy_(0, meta.slot_mapping, v)
        nd = meta.num_decode_tokens
        parts = []
        if nd:
            parts.append(self._decode(q[:nd], kv_cache, meta))
        if meta.num_prefills:
            parts.append(self._prefill(q[nd:], k[nd:], v[nd:], kv_cache, meta))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _blocks(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """``kv_cache[:, block_ids]`` in the model dtype (a quantized cache is dequantized)."""
        if self.kv_format is None:
            return kv_cache[:, block_ids]
        return self.kv_format.gather(kv_cache, block_ids, self.dtype)

    def _gather(self, kv_cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of each row's blocks in one index op: two [B, Hkv, L, D] views."""
        b, nb = block_table.shape
        blocks = self._blocks(kv_cache, block_table)
        _, _, _, bs, h, d = blocks.shape
        kv = blocks.view(2, b, nb * bs, h, d).transpose(2, 3)
        return kv[0], kv[1]

    def _decode(self, q, kv_cache, meta) -> torch.Tensor:
        bd, h, d = q.shape
        num_kv = kv_cache.shape[3]
        qg = q.view(bd, num_kv, h // num_kv, d)  # GQA group as query rows
        kk, vv = self._gather(kv_cache, meta.decode_block_table)
        out = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=meta.decode_mask)
        return out.reshape(bd, h, d)

    def _prefill(self, q, k, v, kv_cache, meta) -> torch.Tensor:
        h, d = q.shape[1], q.shape[2]
        if meta.prefill_batched:
            bp, n = meta.num_prefills, meta.prefill_batched
            qp, kp, vp = (x.view(bp, n, -1, d).transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
            return out.transpose(1, 2).reshape(bp * n, h, d)
        outs = []
        for seg in meta.prefill_segments:
            qs = q[seg.start : seg.end].transpose(0, 1)[None]
            if seg.block_ids is None:
                ks, vs = (x[seg.start : seg.end].transpose(0, 1)[None] for x in (k, v))
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:
                hkv = kv_cache.shape[3]
                kv = self._blocks(kv_cache, seg.block_ids).view(2, -1, hkv, d)[:, : seg.kv_len].transpose(1, 2)
                o = F.scaled_dot_product_attention(qs, kv[0][None], kv[1][None], attn_mask=seg.mask, enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
