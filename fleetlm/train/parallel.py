"""Process groups and the parallel wrappers, applied in torchtitan's order:
PP (``train/pipeline.py``) -> TP -> activation checkpointing -> compile -> FSDP2 / DDP.

TP uses the model's own tensor-parallel layers (``layers/linear.py``, ``layers/vocab.py``):
they are the layers the engine serves with, already sharded at load time by their weight
loaders, and their gradients are tested against one process. DTensor ``parallelize_module``
would need ``nn.Linear`` modules; ours fuse q/k/v and gate/up and pad the vocabulary, so a
TP rank simply builds its slice and the TP group comes from the training ``DeviceMesh``.

Mesh: ``("dp_replicate", "dp_shard", "tp")`` (TP innermost, so a TP group is consecutive
ranks), or ``("pp",)``. DDP (``replicate``) when only ``dp_replicate`` > 1; FSDP2
(``fully_shard`` per decoder layer, then the root) when ``dp_shard`` > 1, as HSDP over both
data-parallel dimensions when ``dp_replicate`` > 1 too. Context parallelism
(``train/context_parallel.py``): mesh ``("dp_shard", "cp")``; gradients are reduced over both
(``replicate`` over ``cp``, or ``fully_shard`` over the flattened ``dp_shard_cp``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from fleetlm.train.config import ParallelismSection, PrecisionSection
from fleetlm.train.config_check import parse_checkpointing

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Layout:
    """This rank's place: data-parallel rank and size (what the data loader shards by)."""

    rank: int
    world: int
    dp_rank: int
    dp: int
    mesh: object | None = None  # DeviceMesh when world > 1
    cp_rank: int = 0  # context parallelism (train/context_parallel.py): this rank's place in
    cp: int = 1  # its CP group, which splits every sequence of the data-parallel rank's batch
    dp_cp_mesh: object | None = None  # CP: the flattened dp_shard x cp mesh (gradient reduction)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_layout(p: ParallelismSection) -> Layout:
    """Join the process group (torchrun's environment, or one already initialised) and build
    the mesh; a world size that differs from the config's product is an error naming both."""
    world = p.world_size
    if world == 1 and not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} ranks but the parallelism "
                             "section multiplies to 1")
        return Layout(0, 1, 0, 1)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError(f"the parallelism section multiplies to {world} ranks but this is one process; "
                             f"launch it with torchrun --nproc-per-node {world}")
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    if dist.get_world_size() != world:
        raise ValueError(f"the mesh pp x dp_replicate x dp_shard x tp x cp = {p.pp} x {p.dp_replicate} x "
                         f"{p.dp_shard} x {p.tp} x {p.cp} = {world} does not match the world size "
                         f"{dist.get_world_size()}")
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rank = dist.get_rank()
    if p.pp > 1:
        return Layout(rank, world, 0, 1, init_device_mesh(device, (p.pp,), mesh_dim_names=("pp",)))
    if p.cp > 1:
        return _cp_layout(p, rank, world, device)
    mesh = init_device_mesh(device, (p.dp_replicate, p.dp_shard, p.tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    dp_rank = mesh["dp_replicate"].get_local_rank() * p.dp_shard + mesh["dp_shard"].get_local_rank()
    if p.tp > 1:
        from fleetlm.distributed.parallel_state import adopt_tp_group

        adopt_tp_group(mesh["tp"].get_group(), mesh["tp"].get_local_rank(), p.tp)
    return Layout(rank, world, dp_rank, p.dp, mesh)


def _cp_layout(p: ParallelismSection, rank: int, world: int, device: str) -> Layout:
    """Mesh ``("dp_shard", "cp")`` (CP innermost: a CP group is consecutive ranks) plus the
    flattened ``dp_shard_cp`` dimension the data-parallel wrapper reduces gradients over."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device, (p.dp_shard, p.cp), mesh_dim_names=("dp_shard", "cp"))
    flat = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return Layout(rank, world, mesh["dp_shard"].get_local_rank(), p.dp, mesh,
                  mesh["cp"].get_local_rank(), p.cp, flat)


def check_model_fits(p: ParallelismSection, num_heads: int, num_kv_heads: int, num_layers: int,
                     tied: bool) -> None:
    """Layout errors that need the model's shape, raised before anything is built."""
    if p.tp > 1:
        from fleetlm.layers.linear import check_heads_divisible

        check_heads_divisible(num_heads, num_kv_heads, p.tp)
        if num_kv_heads % p.tp:
            raise ValueError(f"training with tp {p.tp} needs tp to divide the model's {num_kv_heads} KV heads "
                             "(replicated KV heads would need their gradients summed)")
    if p.pp > num_layers:
        raise ValueError(f"parallelism.pp {p.pp} exceeds the model's {num_layers} layers")
    if p.pp > 1 and tied:
        raise ValueError("pipeline parallelism with tied embeddings (the head on the last stage shares the "
                         "first stage's embedding) is not supported")


def apply_activation_checkpointing(layers: list[nn.Module], mode: str) -> None:
    """Recompute every k-th decoder layer in backward (``mode``: none, full, every:K). The
    layer keeps its name (its ``forward`` is wrapped in place), so state dicts do not change."""
    k = parse_checkpointing(mode)
    if k == 0:
        return
    for i, layer in enumerate(layers):
        if i % k == 0:
            inner = layer.forward
            layer.forward = functools.partial(checkpoint, inner, use_reentrant=False)


def apply_compile(layers: list[nn.Module]) -> None:
    for layer in layers:
        layer.compile()


def apply_data_parallel(root: nn.Module, layers: list[nn.Module], p: ParallelismSection,
                        prec: PrecisionSection, layout: Layout) -> None:
    """FSDP2 (or HSDP) per layer then the root, or DDP, over the mesh's data-parallel dims."""
    if p.cp > 1 and p.dp_shard == 1:  # CP alone: gradients averaged over the CP ranks
        from torch.distributed._composable import replicate

        if prec.param_dtype != "float32":
            raise ValueError("precision.param_dtype bfloat16 needs FSDP (parallelism.dp_shard > 1)")
        replicate(root, device_mesh=layout.mesh["cp"], gradient_as_bucket_view=True)
        return
    if p.dp == 1:
        if prec.param_dtype != "float32":
            raise ValueError("precision.param_dtype bfloat16 needs FSDP (parallelism.dp_shard > 1)")
        return
    if p.dp_shard == 1:
        from torch.distributed._composable import replicate

        if prec.param_dtype != "float32":
            raise ValueError("precision.param_dtype bfloat16 needs FSDP (parallelism.dp_shard > 1), not DDP")
        # gradients live in the all-reduce buckets (no second copy of every gradient)
        replicate(root, device_mesh=layout.mesh["dp_replicate"], gradient_as_bucket_view=True)
        return
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the head returns a view (the vocabulary's padding sliced off); nothing writes into it
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    if p.cp > 1:  # FSDP x CP: shards and gradient reduction over dp_shard x cp
        mesh = layout.dp_cp_mesh
    else:
        mesh = layout.mesh[("dp_replicate", "dp_shard") if p.dp_replicate > 1 else ("dp_shard",)]
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[prec.param_dtype], reduce_dtype=DTYPES[prec.reduce_dtype])
    for i, layer in enumerate(layers):
        # the last layer's params are needed again at once by backward: keep them gathered
        fully_shard(layer, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=p.reshard_after_forward and i < len(layers) - 1)
    lm = root.lm
    if not lm.config.tie_word_embeddings and p.tp == 1:  # embedding and head: units of their own,
        # gathered only while used (with a large vocabulary they are the biggest tensors)
        fully_shard(lm.model.embed_tokens, mesh=mesh, mp_policy=mp, reshard_after_forward=p.reshard_after_forward)
        fully_shard(lm.lm_head, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def match_low_precision_buffers(model: nn.Module, prec: PrecisionSection) -> None:
    """Under mixed precision the rotary tables compute in the parameters' dtype (else the
    rotated q/k would be promoted back to float32 before the bf16 output projection)."""
    dtype = DTYPES[prec.param_dtype]
    if dtype == torch.float32:
        return
    for m in model.modules():
        if hasattr(m, "cos") and hasattr(m, "sin_signed"):
            m.cos, m.sin_signed = m.cos.to(dtype), m.sin_signed.to(dtype)
