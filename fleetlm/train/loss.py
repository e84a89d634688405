"""The training objective around the served model: next-token cross entropy (mean over tokens).

``TrainingLM`` is the root module the data-parallel wrappers see: its forward runs the model
and the head and returns the loss, so FSDP2 gathers the head's weight inside the forward.

Under TP the head's weight holds this rank's vocabulary rows. The logits are gathered with an
autograd function whose backward hands each rank its slice of the (identical) logits gradient,
and the hidden states enter through ``copy_to_tensor_model_parallel_region``, whose backward
sums the hidden-state gradient over the TP ranks' vocabulary slices.
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
        loss = next_token_loss(head_logits(self.lm.lm_head, self.lm(inputs, positions)), targets)
        return loss if self.moe_loss is None else loss + self.moe_loss(self.lm)
