"""The training loop (single process, torchrun, or spawned ranks alike).

A step: ``grad_accumulation`` micro-steps of forward + backward (loss scaled by
``1 / grad_accumulation``; DDP/FSDP2 average gradients over the data-parallel ranks), clip the
global gradient norm, AdamW step, learning-rate schedule. The logged loss is the step's mean over
every micro-batch of every data-parallel rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fleetlm.train.config import TrainConfig
from fleetlm.train.data import BatchPlan, PackedDataset, tokenize_corpus
from fleetlm.train.loss import TrainingLM
from fleetlm.train.metrics import (
    MetricsLog,
    StepMetrics,
    flops_per_token,
    peak_memory_bytes,
    plot_loss,
)
from fleetlm.train.model import TrainModel, build_train_model
from fleetlm.train.optim import build_optimizer, clip_grads, lr_factor
from fleetlm.train.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    apply_data_parallel,
    check_model_fits,
    match_low_precision_buffers,
    setup_layout,
)


@dataclass
class TrainResult:
    metrics: list[StepMetrics]
    trainer: Trainer

    @property
    def losses(self) -> list[float]:
        return [m.loss for m in self.metrics]


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        p = cfg.parallelism
        self.layout = setup_layout(p)
        torch.manual_seed(cfg.training.seed)
        self.tm: TrainModel = build_train_model(cfg.model)
        c = self.tm.config
        check_model_fits(p, c.num_heads, c.num_kv_heads, c.num_layers, c.tie_word_embeddings)
        ck = cfg.checkpoint
        if ck.dir or cfg.lora.save_dir:
            from fleetlm.train.checkpoint import check_layout_supported

            check_layout_supported(p.tp, p.pp, "checkpoint.dir and lora.save_dir")
        if ck.export_hf:
            from fleetlm.train.checkpoint import check_layout_supported

            check_layout_supported(1, p.pp, "checkpoint.export_hf")
        if cfg.lora.r:
            from fleetlm.layers.lora import add_lora

            add_lora(self.tm.model, cfg.lora)
        n = sum(q.numel() for q in self.tm.model.parameters()) * p.tp  # the whole model (TP: every slice)
        self.root, self.pipe = self._wrap(self.tm.model)
        self.named = [(n, q) for n, q in self.root.named_parameters() if q.requires_grad]
        self.optimizer = build_optimizer((q for _, q in self.named), cfg.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.training.steps, cfg.schedule))
        d = cfg.data
        self.dataset = PackedDataset(tokenize_corpus(d, self.tm.tokenizer), d.seq_len, d.seed)
        self.plan = BatchPlan(cfg.training.micro_batch, cfg.training.grad_accumulation, self.layout.dp)
        self.flops_per_token = flops_per_token(n, c.num_layers, c.num_heads, c.head_dim, d.seq_len)
        self.step_index = 0
        self._loaded_step: int | None = None
        if cfg.checkpoint.resume:
            from fleetlm.train.checkpoint import resume_latest

            self._loaded_step = resume_latest(self)

    def _wrap(self, model: nn.Module) -> tuple[nn.Module, object | None]:
        p, prec = self.cfg.parallelism, self.cfg.precision
        if p.pp > 1:
            from fleetlm.train.pipeline import build_pipeline

            if getattr(self.tm.config, "moe", None) is not None:
                raise ValueError("training a mixture-of-experts model with pipeline parallelism is not supported yet")

            pipe = build_pipeline(model, p, self.layout)
            return pipe.stage_module, pipe
        from fleetlm.moe.losses import moe_loss_for

        if p.cp > 1:
            self._install_cp(model)
        root = TrainingLM(model, moe_loss_for(model, self.cfg.moe.aux_loss_coef, self.cfg.moe.z_loss_coef))
        match_low_precision_buffers(root, prec)
        apply_activation_checkpointing(root.decoder_layers, p.activation_checkpointing)
        if p.compile:
            apply_compile(root.decoder_layers)
        apply_data_parallel(root, root.decoder_layers, p, prec, self.layout)
        return root, None

    def _install_cp(self, model: nn.Module) -> None:
        from fleetlm.train.context_parallel import CPShard, install_cp_attention

        if getattr(self.tm.config, "moe", None) is not None:
            raise ValueError("training a mixture-of-experts model with context parallelism is not supported yet")
        lay = self.layout
        self.cp_shard = CPShard(lay.cp_rank, lay.cp)
        install_cp_attention(model, self.cp_shard, lay.mesh["cp"].get_group())

    # -- one step ---------------------------------------------------------------------------------
    def _micro_losses(self, step: int) -> torch.Tensor:
        """Forward + backward over this rank's micro-batches; their summed mean losses."""
        plan, total = self.plan, torch.zeros((), dtype=torch.float64)
        for a in range(plan.accumulation):
            batch = self.dataset.rows(plan.first(step, a, self.layout.dp_rank), plan.micro_batch)
            if self.pipe is not None:
                loss = self.pipe.step(batch.inputs, batch.targets, plan.accumulation)
            elif self.layout.cp > 1:  # this rank's chunks of every sequence, at their global positions
                sh = self.cp_shard
                loss = self.root(sh.split(batch.inputs), sh.split(batch.targets), sh.positions(batch.inputs.shape[1]))
                (loss / plan.accumulation).backward()
            else:
                loss = self.root(batch.inputs, batch.targets)
                (loss / plan.accumulation).backward()
            if loss is not None:
                total += float(loss.detach())
        return total

    def _mean_loss(self, total: torch.Tensor) -> float:
        """The step's loss averaged over micro-batches and data-parallel ranks (TP ranks hold
        the same value; under PP the last stage has it and tells the others; CP ranks hold
        equally many tokens, so their mean is the mean over the whole sequences)."""
        loss = total / self.plan.accumulation
        if self.layout.world == 1:
            return float(loss)
        if self.pipe is not None:
            dist.broadcast(loss, src=self.layout.world - 1)
            return float(loss)
        dist.all_reduce(loss)
        return float(loss) / self.layout.world

    def train_step(self) -> StepMetrics:
        t0, s = time.perf_counter(), self.step_index
        self.optimizer.zero_grad(set_to_none=True)
        total = self._micro_losses(s)
        norm = clip_grads(self.named, self.cfg.training.max_grad_norm, self.pipe is not None)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        loss = self._mean_loss(total)
        self.step_index += 1
        dt = time.perf_counter() - t0
        tokens = self.plan.global_batch * self.cfg.data.seq_len
        peak = self.cfg.logging.peak_flops
        tps = tokens / dt
        mfu = tps * self.flops_per_token / (peak * self.layout.world) if peak else None
        return StepMetrics(s + 1, loss, lr, norm, tokens, dt, tps, mfu, peak_memory_bytes())

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, ck = self.cfg, self.cfg.checkpoint
        log = MetricsLog(cfg.logging.jsonl, cfg.logging.progress, cfg.training.steps - self.step_index,
                         self.layout.is_main)
        try:
            while self.step_index < cfg.training.steps:
                m = self.train_step()
                log.record(m, write=m.step % cfg.logging.every == 0 or m.step == cfg.training.steps)
                if ck.dir and ck.every and m.step % ck.every == 0:
                    self.save_checkpoint()
            if ck.dir and not ck.every:
                self.save_checkpoint()
        finally:
            log.close()
        self._finish(log)
        return TrainResult(log.rows, self)

    def _finish(self, log: MetricsLog) -> None:
        cfg = self.cfg
        if cfg.checkpoint.export_hf:
            from fleetlm.train.export import export_hf

            export_hf(self, cfg.checkpoint.export_hf)
        if cfg.lora.save_dir:
            from fleetlm.train.export import export_lora

            export_lora(self, cfg.lora.save_dir)
        if cfg.logging.plot and self.layout.is_main and log.rows:
            plot_loss(log.rows, cfg.logging.plot)

    def save_checkpoint(self) -> None:
        from fleetlm.train.checkpoint import save_checkpoint

        save_checkpoint(self)


def train(cfg: TrainConfig) -> TrainResult:
    """Train with ``cfg`` in this process (one rank of the mesh when a process group is up)."""
    return Trainer(cfg).run()
