"""A worker owns a device, the model weights on it, the KV cache and a ModelRunner.

The executor calls its methods by name (``collective_rpc``), so a multi-process executor can
mirror the same calls to one worker per tensor/pipeline-parallel rank.
"""

from __future__ import annotations

import logging
import os

import torch

from fleetlm.config import EngineArgs
from fleetlm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from fleetlm.models.loader import LoadedModel
from fleetlm.models.registry import get_model_class
from fleetlm.plan import kv_cache_bytes_per_token, kv_cache_num_blocks
from fleetlm.worker.model_runner import ModelRunner

logger = logging.getLogger("fleetlm")

DEFAULT_CPU_KV_BYTES = 2 << 30


class Worker:
    def __init__(self, args: EngineArgs, dtype: torch.dtype, max_model_len: int) -> None:
        self.args = args
        self.dtype = dtype
        self.device = torch.device(args.resolved_device)
        self.max_model_len = max_model_len
        self.runner: ModelRunner | None = None
        if self.device.type == "cpu" or args.num_threads:
            torch.set_num_threads(args.num_threads or len(os.sched_getaffinity(0)))
        torch.manual_seed(args.seed)  # unseeded requests draw from the global generator

    def load_model(self, files: LoadedModel) -> None:
        cls = get_model_class(files.config.architecture)
        with torch.device(self.device):  # params are torch.empty: filled by load_weights
            model = cls(files.config, self.dtype, self.max_model_len)
        model.load_weights(files.weights)
        model.eval()
        if self.device.type == "cpu" and self.dtype != torch.float32 and hasattr(model, "use_fused_ops"):
            from fleetlm.ops import cpu_ops

            ops = cpu_ops()
            if ops is not None:
                model.use_fused_ops(ops)
        self.runner = ModelRunner(model, block_size=self.args.block_size, device=self.device,
                                  eos_token_ids=files.tokenizer.eos_token_ids,
                                  attention_backend=self.args.attention_backend)

    def kv_bytes_per_token(self) -> int:
        c = self.runner.cfg
        return kv_cache_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype.itemsize)

    def determine_num_blocks(self) -> int:
        """KV blocks that fit the budget: ``kv_cache_memory`` bytes on CPU, a fraction of free
        memory (after weights, minus a workspace reserve) on CUDA."""
        if self.args.num_kv_blocks is not None:
            return self.args.num_kv_blocks
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            workspace = self.args.max_num_batched_tokens * self.runner.cfg.vocab_size * 4 + (512 << 20)
            util = self.args.gpu_memory_utilization or 0.9
            budget = self.args.kv_cache_memory or int(free * util) - workspace
        else:
            budget = self.args.kv_cache_memory or DEFAULT_CPU_KV_BYTES
        return kv_cache_num_blocks(budget, self.args.block_size, self.kv_bytes_per_token())

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks, self.dtype)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(so)
