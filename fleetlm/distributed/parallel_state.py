"""Who this process is in a tensor x pipeline parallel layout, and its process groups.

Ranks are laid out TP-major, as in a ``DeviceMesh(("pp", "tp"))``: global rank
``r = pp_rank * tp_size + tp_rank``. Ranks of one pipeline stage form a TP group; ranks with the
same ``tp_rank`` form a PP group (stage i sends its hidden states to stage i+1 of that group).

A single process (``tp = pp = 1``) never initialises ``torch.distributed``: every helper below
answers as rank 0 of a group of one, and the collectives are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_output_rank(self) -> bool:
        """The rank that samples and returns the step's output: TP rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0

    @property
    def next_stage_rank(self) -> int:
        return self.rank + self.tp_size

    @property
    def prev_stage_rank(self) -> int:
        return self.rank - self.tp_size

    @staticmethod
    def output_rank(cfg: ParallelConfig) -> int:
        return (cfg.pipeline_parallel_size - 1) * cfg.tensor_parallel_size


_SINGLE = RankInfo(0, 1, 0, 1, 0, 1)
_STATE: RankInfo = _SINGLE
_TP_GROUP: dist.ProcessGroup | None = None
_PP_GROUP: dist.ProcessGroup | None = None
_CPU_GROUP: dist.ProcessGroup | None = None  # gloo over every rank, for control messages


def parallel_state() -> RankInfo:
    return _STATE


def get_tp_group() -> dist.ProcessGroup | None:
    return _TP_GROUP


def get_pp_group() -> dist.ProcessGroup | None:
    return _PP_GROUP


def get_cpu_group() -> dist.ProcessGroup | None:
    return _CPU_GROUP


def default_backend(device: torch.device) -> str:
    """gloo on CPU, NCCL on CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(cfg: ParallelConfig, rank: int, device: torch.device, *, init_method: str | None = None,
                     timeout_s: float = 120.0) -> RankInfo:
    """Join the default process group (``init_method``, or torchrun's ``MASTER_ADDR``/``MASTER_PORT``
    environment) and build this rank's TP and PP groups. Every rank must call it."""
    global _STATE, _TP_GROUP, _PP_GROUP, _CPU_GROUP
    world, tp, pp = cfg.world_size, cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    if world == 1:
        _STATE = _SINGLE
        return _STATE
    if device.type == "cuda" and "LOCAL_RANK" not in os.environ and world > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world} ranks, but this machine has "
                         f"{torch.cuda.device_count()} GPU(s); use torchrun to span machines")
    if device.type == "cuda":  # one GPU per local rank, before any NCCL call
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
    if not dist.is_initialized():
        dist.init_process_group(default_backend(device), init_method=init_method or "env://", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
    if dist.get_world_size() != world:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks but tensor_parallel_size x "
                         f"pipeline_parallel_size = {tp} x {pp} = {world}")
    _CPU_GROUP = dist.new_group(list(range(world)), backend="gloo")
    for s in range(pp):  # every rank creates every group, in the same order (new_group's rule)
        g = dist.new_group(list(range(s * tp, (s + 1) * tp)))
        if s == rank // tp:
            _TP_GROUP = g
    for t in range(tp):
        g = dist.new_group(list(range(t, world, tp)))
        if t == rank % tp:
            _PP_GROUP = g
    _STATE = RankInfo(rank, world, rank % tp, tp, rank // tp, pp)
    return _STATE


def adopt_tp_group(group: dist.ProcessGroup, tp_rank: int, tp_size: int) -> RankInfo:
    """Training: make ``group`` (a TP slice of a larger ``DeviceMesh`` whose other dimensions
    are data-parallel) this rank's TP group, with one pipeline stage. The default process
    group must already be initialised; ``destroy_distributed`` undoes it."""
    global _STATE, _TP_GROUP
    _TP_GROUP = group
    _STATE = RankInfo(dist.get_rank(), dist.get_world_size(), tp_rank, tp_size, 0, 1)
    return _STATE


def destroy_distributed(barrier: bool = False) -> None:
    """Leave every process group. ``barrier=True`` (a run that ended normally on every rank) meets
    the other ranks first, so no rank tears down its gloo pairs while a peer's last collective is
    still in flight (seen once in CI: a rank aborted with ``std::terminate`` in teardown). Never
    after a failure: a barrier would then wait for ranks that may not come."""
    global _STATE, _TP_GROUP, _PP_GROUP, _CPU_GROUP
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _STATE, _TP_GROUP, _PP_GROUP, _CPU_GROUP = _SINGLE, None, None, None


def env_rank() -> int | None:
    """The global rank torchrun gave this process, if it was started by torchrun."""
    r = os.environ.get("RANK")
    return None if r is None else int(r)


def check_parallel_fits(num_heads: int, num_kv_heads: int, num_layers: int, tp: int, pp: int) -> None:
    """``ValueError`` naming both numbers when a layout cannot split this model."""
    from fleetlm.layers.linear import check_heads_divisible

    check_heads_divisible(num_heads, num_kv_heads, tp)
    if pp > num_layers:
        raise ValueError(f"pipeline_parallel_size {pp} exceeds the model's {num_layers} layers")


def reachable_address() -> str:
    """This host's address on the interface that leads to torchrun's master (what other nodes
    can reach); 127.0.0.1 on a single machine."""
    import socket

    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
