"""Pipeline parallelism with ``torch.distributed.pipelining`` (GPipe or 1F1B).

Each rank builds the whole model, then keeps only its stage: layers outside its contiguous range
(as even as possible) become ``PPMissingLayer``, the embedding stays on the first stage, the
final norm and the head on the last. Parameter names do not change. A stage hands the next one
the hidden states and the residual stream (the model's two-tensor ``IntermediateTensors``).

The schedule splits each micro-batch into ``pp_microbatches`` chunks; with ``scale_grads`` the
gradients are divided by the chunk count, so the step's gradient is that of the mean loss, as
in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fleetlm.models.llama import PPMissingLayer
from fleetlm.train.config import ParallelismSection
from fleetlm.train.loss import head_logits, next_token_loss
from fleetlm.train.parallel import Layout, apply_activation_checkpointing


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Contiguous layers of ``stage``; the first ``num_layers % pp`` stages take one more."""
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class StageModule(nn.Module):
    """One pipeline stage of the model (names as in the whole model, under ``lm.``)."""

    def __init__(self, lm: nn.Module, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        m = lm.model
        for i in range(len(m.layers)):
            if i not in layers:
                m.layers[i] = PPMissingLayer()
        if not first:
            m.embed_tokens = PPMissingLayer()
        if not last:
            m.norm = PPMissingLayer()
            lm.lm_head = PPMissingLayer()
        self.lm, self.layer_ids, self.first, self.last = lm, layers, first, last

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return [self.lm.model.layers[i] for i in self.layer_ids]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        m = self.lm.model
        hidden = m.embed_tokens(x) if self.first else x
        positions = torch.arange(hidden.shape[1])
        for i in self.layer_ids:
            hidden, residual = m.layers[i](positions, hidden, residual)
        if not self.last:
            return hidden, residual
        hidden, _ = m.norm(hidden, residual)
        return head_logits(self.lm.lm_head, hidden)


@dataclass
class Pipeline:
    stage_module: StageModule
    schedule: object
    first: bool
    last: bool

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, accumulation: int) -> torch.Tensor | None:
        """Forward and backward of one micro-batch through every stage; the mean loss on the
        last stage (None elsewhere)."""
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.first else ()
        kwargs = {"target": targets, "losses": losses} if self.last else {}
        self.schedule.step(*args, **kwargs)
        return torch.stack(losses).mean() if self.last else None


def build_pipeline(lm: nn.Module, p: ParallelismSection, layout: Layout) -> Pipeline:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = layout.rank
    first, last = stage == 0, stage == p.pp - 1
    module = StageModule(lm, stage_layers(lm.config.num_layers, p.pp, stage), first, last)
    apply_activation_checkpointing(module.decoder_layers, p.activation_checkpointing)
    pipe_stage = PipelineStage(module, stage, p.pp, torch.device("cpu"), group=layout.mesh["pp"].get_group())
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[p.pp_schedule]
    schedule = cls(pipe_stage, n_microbatches=p.pp_microbatches, loss_fn=next_token_loss, scale_grads=True)
    return Pipeline(module, schedule, first, last)
