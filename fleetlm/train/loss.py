"""The training objective around the served model: next-token cross entropy (mean over tokens).

``TrainingLM`` is the root module the data-parallel wrappers see: its forward runs the model
and the head and returns the loss, so FSDP2 gathers the head's weight inside the forward.

Under TP the head's weight holds this rank's vocabulary rows, and the loss is computed on
them without gathering the logits (vocabulary-parallel cross entropy): the max, the sum of
exponentials and the target's logit are all-reduced over the TP group, and each rank's backward
is its own slice's ``softmax - onehot``. The hidden states enter through
``copy_to_tensor_model_parallel_region``, whose backward sums the hidden-state gradient over the
TP ranks' vocabulary slices. ``head_logits`` (full logits on every rank, gathered with an
autograd function) stays for callers that need the logits themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fleetlm.distributed.communication import copy_to_tensor_model_parallel_region
from fleetlm.distributed.parallel_state import get_tp_group, parallel_state


class _GatherVocab(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        st = parallel_state()
        ctx.rank, ctx.width = st.tp_rank, local.shape[-1]
        parts = [torch.empty_like(local) for _ in range(st.tp_size)]
        dist.all_gather(parts, local.contiguous(), group=get_tp_group())
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.narrow(-1, ctx.rank * ctx.width, ctx.width).contiguous()


def head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits on every TP rank, differentiable through every rank's slice."""
    if parallel_state().tp_size == 1:  # through the module: FSDP2 gathers its weight in a hook
        return head(hidden)
    local = F.linear(copy_to_tensor_model_parallel_region(hidden), head.weight)
    return _GatherVocab.apply(local)[..., : head.vocab_size]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross entropy from this rank's vocabulary columns ``[start, start + width)``;
    columns at or past ``vocab`` (padding) take no part."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, targets: torch.Tensor, start: int, vocab: int) -> torch.Tensor:
        group = get_tp_group()
        width = local.shape[-1]
        valid = min(width, max(0, vocab - start))
        x = local.float()
        if valid < width:
            x = x.clone()
            x[:, valid:] = float("-inf")
        m = x.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(x - m[:, None])
        s = e.sum(dim=-1)
        dist.all_reduce(s, group=group)
        mine = (targets >= start) & (targets < start + valid)
        idx = (targets - start).clamp(0, width - 1)
        t = torch.where(mine, x.gather(1, idx[:, None])[:, 0], torch.zeros_like(m))
        dist.all_reduce(t, group=group)
        ctx.save_for_backward(e.div_(s[:, None]), mine, idx)  # the softmax, in place: one [N, V/tp] buffer
        ctx.dtype = local.dtype
        return torch.log(s) + m - t

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, mine, idx = ctx.saved_tensors  # the softmax, turned into its gradient in place (one backward)
        rows = torch.nonzero(mine)[:, 0]
        g[rows, idx[rows]] -= 1.0
        return g.mul_(grad[:, None]).to(ctx.dtype), None, None, None


def vocab_parallel_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss under TP without the full logits on any rank."""
    st = parallel_state()
    local = F.linear(copy_to_tensor_model_parallel_region(hidden), head.weight)
    width = local.shape[-1]
    per_token = _VocabParallelCE.apply(local.flatten(0, -2), targets.flatten(), st.tp_rank * width, head.vocab_size)
    return per_token.mean()


class TrainingLM(nn.Module):
    """``forward(inputs [B, T], targets [B, T])`` -> mean next-token loss (plus, for an MoE,
    its router losses: ``moe_loss``, fleetlm/moe/losses.py)."""

    def __init__(self, lm: nn.Module, moe_loss=None) -> None:
        super().__init__()
        self.lm = lm
        self.moe_loss = moe_loss

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return [self.lm.layers[i] for i in self.lm.layer_range]

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions``: the tokens' positions (context parallelism: global positions of this
        rank's chunks); None: ``0 .. T-1``."""
        hidden = self.lm(inputs, positions)
        if parallel_state().tp_size > 1:
            loss = vocab_parallel_loss(self.lm.lm_head, hidden, targets)
        else:
            loss = next_token_loss(head_logits(self.lm.lm_head, hidden), targets)
        return loss if self.moe_loss is None else loss + self.moe_loss(self.lm)
