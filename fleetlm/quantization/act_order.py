"""GPTQ act order in the int4 method: a layer whose input columns belong to their groups in any
order (``g_idx``), sorted into group order at load, the input gathered the same way per call.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.quantization.base import drop_param
from fleetlm.quantization.int4 import Int4LinearMethod


class ActOrderInt4LinearMethod(Int4LinearMethod):
    """GPTQ act order: ``g_idx[k]`` is the group of input column ``k``, in any order. The layer
    loads every group's scales and zeros and its own input columns' codes and ``g_idx``; at the end
    its columns are sorted by group (each group padded to whole kernel groups with zero-weight
    columns) and ``apply`` gathers ``x`` the same way before the int4 kernel."""

    def __init__(self, group_size: int) -> None:
        super().__init__(group_size, prequantized=True)

    def create_weights(self, layer, in_per_rank: int, out_per_rank: int, dtype: torch.dtype) -> None:
        total_in = getattr(layer, "input_size", in_per_rank)
        if total_in % self.group_size:
            raise ValueError(f"int4 group size {self.group_size} does not divide the input size of "
                             f"{type(layer).__name__} ({total_in})")
        layer.act_dtype = dtype
        layer.qweight = nn.Parameter(torch.empty(out_per_rank, in_per_rank, dtype=torch.uint8), requires_grad=False)
        # a row-parallel rank's columns may come from any group: every rank holds every group's scales
        layer.scales = nn.Parameter(torch.empty(out_per_rank, total_in // self.group_size), requires_grad=False)
        layer.zeros = nn.Parameter(torch.empty(out_per_rank, total_in // self.group_size), requires_grad=False)
        layer.g_idx = nn.Parameter(torch.full((in_per_rank,), -1, dtype=torch.int32), requires_grad=False)
        if hasattr(type(layer), "weight_loader"):
            layer.weight_loader = types.MethodType(_act_order_weight_loader, layer)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        g_idx = drop_param(layer, "g_idx").long().cpu()
        if g_idx.numel() and int(g_idx.min()) < 0:
            raise ValueError("act-order g_idx was not loaded")
        q, s, z = (drop_param(layer, n) for n in ("qweight", "scales", "zeros"))
        idx, kernel_groups = act_order_layout(g_idx, self.group_size)
        k = g_idx.numel()
        layer.act_in_features = k
        if idx.numel() == k and torch.equal(idx, torch.arange(k)):
            layer.in_perm, layer.in_pad = None, False
        else:
            idx = idx.to(q.device)
            layer.register_buffer("in_perm", idx, persistent=False)
            layer.in_pad = bool((idx == k).any())
            q = torch.cat([q, torch.full_like(q[:, :1], 8)], dim=1)[:, idx]  # pad columns: code 8, x = 0
        kernel_groups = kernel_groups.to(s.device)
        s, z = s[:, kernel_groups].contiguous(), z[:, kernel_groups].contiguous()
        for name, t in (("qweight", q.contiguous()), ("scales", s), ("zeros", z)):
            setattr(layer, name, nn.Parameter(t, requires_grad=False))
        super().process_weights_after_loading(layer)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.in_perm is not None:
            x = (F.pad(x, (0, 1)) if layer.in_pad else x).index_select(-1, layer.in_perm)
        return super().apply(layer, x, bias)

    def dequantized(self, layer) -> torch.Tensor:
        """The weight this layer computes with, [N, K] fp32 in the checkpoint's column order."""
        w = super().dequantized(layer)
        if layer.in_perm is None:
            return w
        out = torch.zeros(w.shape[0], layer.act_in_features + 1, dtype=w.dtype, device=w.device)
        out[:, layer.in_perm] = w
        return out[:, :-1]


def act_order_layout(g_idx: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns sorted by group, each group padded to whole kernel groups of ``group_size``:
    (``idx`` [K'], the source column of each new one, ``len(g_idx)`` for a padding column;
    ``kernel_groups`` [K' / group_size], the checkpoint group of each kernel group)."""
    k = g_idx.numel()
    order = torch.sort(g_idx, stable=True).indices
    groups, counts = torch.unique_consecutive(g_idx[order], return_counts=True)
    blocks = (counts + group_size - 1) // group_size
    slot_start = torch.cumsum(blocks * group_size, 0) - blocks * group_size
    run_start = torch.cumsum(counts, 0) - counts
    run = torch.repeat_interleave(torch.arange(len(counts)), counts)
    target = slot_start[run] + torch.arange(k) - run_start[run]
    idx = torch.full((int(blocks.sum()) * group_size,), k, dtype=torch.long)
    idx[target] = order
    return idx, torch.repeat_interleave(groups, blocks)


def _act_order_weight_loader(layer, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """The layer's own loader, except for what act order adds: ``g_idx`` (this rank's input
    columns; one per merged layer, so its parts must agree) and, on a rank holding a slice of the
    input, every group's scales and zeros."""
    split_input = layer.in_per_rank != layer.input_size
    if param is layer.g_idx:
        if tuple(loaded.shape) != (layer.input_size,):
            raise ValueError(f"g_idx has shape {tuple(loaded.shape)}, expected ({layer.input_size},)")
        mine = loaded.narrow(0, layer.tp_rank * layer.in_per_rank, layer.in_per_rank) if split_input else loaded
        if int(param.data.min()) >= 0 and not torch.equal(param.data, mine.to(param.dtype)):
            raise ValueError(f"g_idx of shard {shard_id} differs from the other parts of this merged layer; "
                             "act-order parts that share an input must share their g_idx")
        with torch.no_grad():
            param.data.copy_(mine)
        return
    if split_input and (param is layer.scales or param is layer.zeros):
        if tuple(loaded.shape) != tuple(param.shape):
            raise ValueError(f"act-order scales / zeros have shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            param.data.copy_(loaded)
        return
    type(layer).weight_loader(layer, param, loaded, shard_id)
