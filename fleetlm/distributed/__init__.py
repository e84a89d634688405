"""Process groups and collectives for tensor and pipeline parallelism (torch.distributed)."""

from fleetlm.distributed.parallel_state import (
    ParallelConfig,
    destroy_distributed,
    get_pp_group,
    get_tp_group,
    init_distributed,
    parallel_state,
)

__all__ = ["ParallelConfig", "destroy_distributed", "get_pp_group", "get_tp_group", "init_distributed",
           "parallel_state"]
