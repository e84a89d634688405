"""Training: memory per GPU for DDP, ZeRO-1/2/3 and FSDP2; FLOPs and wall-clock.

Mixed-precision Adam, as in the ZeRO paper (Rajbhandari et al., 2020, sec. 3.1): bf16 params
(2 B) and grads (2 B) plus fp32 master params, momentum and variance (12 B) = 16 B/param.
ZeRO-1 shards the 12 B over the ``dp`` ranks, ZeRO-2 also the grads, ZeRO-3 also the params
(and gathers two layers' bf16 params at a time: the current one and the prefetched next).
PyTorch FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` keeps the
sharded params in fp32 (4), grads in fp32 (4) and Adam state (8): 16 B/param / dp. While the
activations peak (the start of backward) it also holds, unsharded in the compute dtype: the
LM head (its own unit, kept gathered from its forward to its backward), and for the largest
decoder layer in backward its params, the prefetched next layer's, the layer's grads, and the
reduce-scatter's flat input in the fp32 reduce dtype. DDP keeps its gradients as views of the
all-reduce buckets (``gradient_as_bucket_view``, as fleetlm's trainer does), so no second copy.
The optimizer step makes, for its largest tensor (this rank's slice of the embedding or head,
or of the widest matrix), the two fp32 temporaries AdamW's ``sqrt(v) / bias_correction`` makes
(PyTorch's per-tensor implementation); they come after backward has freed the activations, so
the peak is the states plus the larger of (activations + gathered buffers) and those
temporaries. These are live tensor bytes (what ``torch.cuda.max_memory_allocated`` reports on a
GPU); the allocator's own retention (reserved minus allocated; on a CPU, the resident set minus
allocated) comes on top.

Activations saved for backward, per token and layer, bf16, flash attention (no score matrix):
the two norm inputs and their outputs (4h), Q, K, V and the attention output
((2H + 2KV) * head_dim), and the MLP's gate, up, activation and product (4 * intermediate).
For Llama-2-7B that is 37.5 h bytes (SwiGLU has a third matrix) vs the 34 h of
Korthikanti et al. (2022) for GPT with dropout masks.
With full activation checkpointing only each layer's input (2h bytes) is kept, plus one
layer's activations while it is recomputed. Logits: fp32 values and their gradient, 8 B per
vocabulary entry per token. Tensor parallelism with sequence parallelism divides all of these
by ``tp``; with 1F1B pipelining the first stage holds ``pp`` micro-batches of ``L/pp`` layers,
i.e. as much as one micro-batch through all layers.

FLOPs: ``6 * N * D`` (forward 2ND, backward 4ND; N active params, D tokens), plus attention
``6 * L * H * head_dim * seq`` per token when asked. Compute-optimal data: ~20 tokens per
parameter (Hoffmann et al., 2022, "Chinchilla").
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.plan.errors import PlanError
from fleetlm.plan.hardware import HardwareSpec
from fleetlm.plan.memory import mlp_width
from fleetlm.plan.model_spec import ModelSpec, count_params, layer_params

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp2")
CHINCHILLA_TOKENS_PER_PARAM = 20


@dataclass(frozen=True)
class StrategyMemory:
    """Bytes per GPU under one data-parallel strategy."""

    strategy: str
    params: float
    grads: float
    optimizer: float
    buffers: float
    activations: float
    activations_ckpt: float
    overhead: float
    usable: float

    step_temps: float = 0.0  # the optimizer step's temporaries (after backward: no activations then)

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers + self.overhead

    @property
    def total(self) -> float:
        return self.states + max(self.activations, self.step_temps - self.buffers)

    @property
    def total_ckpt(self) -> float:
        return self.states + max(self.activations_ckpt, self.step_temps - self.buffers)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    @property
    def fits_ckpt(self) -> bool:
        return self.total_ckpt <= self.usable

    def as_dict(self) -> dict[str, object]:
        keys = ("params", "grads", "optimizer", "buffers", "activations", "activations_ckpt", "step_temps")
        return {**{k: round(getattr(self, k)) for k in keys}, "total": round(self.total),
                "total_ckpt": round(self.total_ckpt), "fits": self.fits, "fits_ckpt": self.fits_ckpt}


def params_per_gpu(m: ModelSpec, tp: int, pp: int, ep: int) -> float:
    c = count_params(m)
    return ((c.total - c.experts) / tp + c.experts / ep) / pp


def activation_bytes(m: ModelSpec, seq_len: int, micro_batch: int, tp: int,
                     checkpointing: bool, act_bytes: int = 2) -> float:
    """Saved activations on the most loaded GPU for one micro-batch (see module doc);
    ``act_bytes`` per saved value: 2 for bf16, 4 when training computes in float32."""
    h, tokens = m.hidden_size, seq_len * micro_batch
    per_layer = act_bytes * (4 * h + (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim + 4 * mlp_width(m))
    logits = 8 * m.vocab_size * tokens
    if checkpointing:
        body = m.num_layers * act_bytes * h * tokens + per_layer * tokens
    else:
        body = m.num_layers * per_layer * tokens
    return (body + logits) / tp


def state_bytes(strategy: str, n: float, dp: int, layer: float = 0.0,
                compute_bytes: int = 2, head: float = 0.0) -> tuple[float, ...]:
    """(params, grads, optimizer, gather buffers) bytes per GPU for ``n`` params and ``dp`` ranks.

    ``layer`` is the parameter count of the largest unit ZeRO-3 gathers at once (a decoder layer,
    or the embedding / LM head when the vocabulary makes them bigger); for FSDP2 the largest
    decoder layer, and ``head`` the LM head's (its own unit, gathered from its forward to its
    backward). Gathered in the compute dtype (``compute_bytes``: 2 for bf16, 4 for float32).
    """
    cb = compute_bytes
    if strategy == "fsdp2":  # head + layer params x2 (current, prefetched) + its grads + fp32 reduce input
        return 4 * n / dp, 4 * n / dp, 8 * n / dp, cb * head + 3 * cb * layer + 4 * layer
    p, g, o = {"ddp": (1, 1, 1), "zero1": (1, 1, dp), "zero2": (1, dp, dp),
               "zero3": (dp, dp, dp)}[strategy]
    return 2 * n / p, 2 * n / g, 12 * n / o, (2 * cb * layer if strategy == "zero3" else 0.0)


def strategy_memory(m: ModelSpec, hw: HardwareSpec, strategy: str, *, dp: int, tp: int = 1,
                    pp: int = 1, ep: int = 1, seq_len: int = 4096, micro_batch: int = 1,
                    memory_utilization: float = 0.9, act_bytes: int = 2) -> StrategyMemory:
    """``act_bytes``: bytes per value of the compute dtype (activations and gathered params)."""
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown training strategy {strategy!r}; accepted values: "
                        f"{', '.join(STRATEGIES)}")
    n = params_per_gpu(m, tp, pp, ep)
    # FSDP units: each decoder layer, and the embedding and head (one unit when tied)
    layer = max(sum(layer_params(m, i)) for i in range(m.num_layers)) / tp
    head = m.vocab_size * m.hidden_size / tp
    if strategy == "fsdp2":
        params, grads, optimizer, buffers = state_bytes(strategy, n, dp, layer, act_bytes, head)
    else:
        params, grads, optimizer, buffers = state_bytes(strategy, n, dp, max(layer, head), act_bytes)
    biggest = max(m.vocab_size * m.hidden_size, m.hidden_size * mlp_width(m)) / tp
    step_temps = 2 * 4 * biggest / (dp if strategy in ("zero1", "zero2", "zero3", "fsdp2") else 1)
    return StrategyMemory(
        strategy, params, grads, optimizer, buffers,
        activation_bytes(m, seq_len, micro_batch, tp, False, act_bytes),
        activation_bytes(m, seq_len, micro_batch, tp, True, act_bytes),
        hw.runtime_overhead_bytes, hw.memory_bytes * memory_utilization, step_temps)


@dataclass(frozen=True)
class TrainingCompute:
    params_active: int
    tokens: float
    chinchilla_tokens: float
    flops: float
    flops_with_attention: float
    wallclock_s: float
    gpu_hours: float


def training_compute(m: ModelSpec, hw: HardwareSpec, gpus: int, *, tokens: float | None,
                     mfu: float, seq_len: int) -> TrainingCompute:
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    c = count_params(m)
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * c.total
    d = float(tokens) if tokens is not None else chinchilla
    if d <= 0:
        raise PlanError(f"--tokens must be positive, got {tokens}")
    flops = 6 * c.active * d
    attn = 6 * m.num_layers * m.num_heads * m.attn_qk_dim * seq_len * d
    seconds = flops / (gpus * hw.flops_for("bf16")[0] * mfu)
    return TrainingCompute(c.active, d, chinchilla, flops, flops + attn, seconds,
                           seconds * gpus / 3600)
