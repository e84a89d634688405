"""A worker owns a device, its rank's shard of the model, its KV cache and a ModelRunner.

The executor calls its methods by name (``collective_rpc``); with tensor/pipeline parallelism
there is one worker per rank, each in its own process, each loading its own shard from the model
path, all receiving the same calls in the same order.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from fleetlm.config import EngineArgs
from fleetlm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from fleetlm.distributed.parallel_state import RankInfo, parallel_state
from fleetlm.models.loader import LoadedModel
from fleetlm.models.registry import build_model
from fleetlm.plan import kv_cache_bytes_per_token, kv_cache_num_blocks
from fleetlm.worker.model_runner import ModelRunner

logger = logging.getLogger("fleetlm")

DEFAULT_CPU_KV_BYTES = 2 << 30


def default_num_threads(ranks_on_this_host: int) -> int:
    """CPU intra-op threads of one rank: this host's usable cores divided by its ranks (>= 1)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, ranks_on_this_host))


class Worker:
    def __init__(self, args: EngineArgs, dtype: torch.dtype, max_model_len: int, *, local_ranks: int = 1) -> None:
        self.args = args
        self.dtype = dtype
        self.device = torch.device(args.resolved_device)
        if self.device.type == "cuda":  # this rank's GPU (init_distributed chose it)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_model_len = max_model_len
        self.runner: ModelRunner | None = None
        self.step_seconds = 0.0
        if self.device.type == "cpu" or args.num_threads:
            torch.set_num_threads(args.num_threads or default_num_threads(local_ranks))
        torch.manual_seed(args.seed)  # unseeded requests draw from the global generator

    @property
    def rank(self) -> RankInfo:
        return parallel_state()

    def load_model(self, files: LoadedModel) -> None:
        """Build this rank's part of the model and load its slice of every weight."""
        cfg = files.config
        st = self.rank
        layers = self.args.stage_layers(cfg.num_layers)[st.pp_rank]
        model = build_model(files, self.dtype, self.max_model_len, layers, self.device)
        model.eval()
        self.runner = ModelRunner(model, block_size=self.args.block_size, device=self.device,
                                  eos_token_ids=files.tokenizer.eos_token_ids,
                                  attention_backend=self.args.attention_backend,
                                  kv_cache_dtype=self.args.kv_cache_dtype)
        if self.args.speculative_config is not None:
            from fleetlm.spec_decode.worker_hook import SpecDecodeWorker

            self.runner.spec = SpecDecodeWorker(self.args.speculative_config, self.runner, files.tokenizer,
                                                self.max_model_len)
        if self.args.enable_lora:
            self._init_lora(files)

    # -- LoRA adapters (fleetlm/lora): every rank holds its layers' share of each ----------------
    def _init_lora(self, files: LoadedModel) -> None:
        from fleetlm.lora.serving import LoRAManager

        self.runner.lora = LoRAManager(self.runner.model, self.args.max_loras)
        for name, path in self.args.lora_modules:
            self.add_lora(name, path)

    def add_lora(self, name: str, path: str) -> int:
        """Load the adapter at ``path`` as ``name``; returns its parameter count on this rank."""
        from fleetlm.lora.adapter import load_lora_weights

        r = self.runner
        weights = load_lora_weights(name, path, r.cfg, self.dtype, r.layer_ids)
        r.lora.add(weights)
        return weights.num_params

    def remove_lora(self, name: str) -> None:
        self.runner.lora.remove(name)

    def ready(self) -> int:
        return self.rank.rank

    def kv_bytes_per_token(self) -> int:
        """This rank's KV bytes per token: its stage's layers, its KV heads."""
        r = self.runner
        fmt = r.backend.kv_format  # a quantized KV cache: its element size and row size
        head, elem = (r.cfg.head_dim, self.dtype.itemsize) if fmt is None else (fmt.head_size(r.cfg.head_dim), 1)
        own = kv_cache_bytes_per_token(len(r.layer_ids), r.num_kv_heads, head, elem)
        return own + (r.spec.kv_bytes_per_token() if r.spec is not None else 0)  # a draft's cache shares the blocks

    def spec_draft_cost(self) -> float:
        """The proposer's cost per draft token, as a fraction of a target step."""
        return self.runner.spec.proposer.draft_cost()

    def kv_cache_bytes(self) -> int:
        return 0 if self.runner.kv_cache is None else self.runner.kv_cache.nbytes

    def determine_num_blocks(self) -> int:
        """KV blocks that fit this rank's budget: ``kv_cache_memory`` bytes on CPU, a fraction
        of free memory (after weights, minus a workspace reserve) on CUDA."""
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

    def attention_backend_name(self) -> str:
        return self.runner.backend.name

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput | None:
        t0 = time.perf_counter()
        try:
            return self.runner.execute_model(so)
        finally:
            self.step_seconds += time.perf_counter() - t0

    # -- KV transfer (fleetlm/disagg): the connector reads and writes whole blocks -------------
    def kv_fingerprint(self) -> dict:
        """What a K/V consumer must agree on with its producer (checked at the handshake)."""
        from fleetlm.disagg.layout import weights_digest

        c, cache = self.runner.cfg, self.runner.kv_cache
        kv_dtype = getattr(self.args, "kv_cache_dtype", "auto")  # quantized rows carry their scales inline
        dtype = str(cache.dtype).removeprefix("torch.") + ("" if kv_dtype == "auto" else f"/{kv_dtype}")
        return {"architecture": c.architecture, "num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads,
                "head_dim": cache.shape[-1], "dtype": dtype,
                "block_size": self.args.block_size, "weights_digest": weights_digest(self.runner.model)}

    def export_kv(self, block_ids: list[int]) -> tuple[range, range, torch.Tensor]:
        """This rank's layers, KV heads, and K/V of ``block_ids`` (block-major, on the CPU)."""
        from fleetlm.disagg.layout import export_blocks, kv_head_range

        r, st = self.runner, self.rank
        heads = kv_head_range(st.tp_rank, st.tp_size, r.cfg.num_kv_heads)
        return r.layer_ids, heads, export_blocks(r.kv_cache, block_ids)

    def import_kv(self, block_ids: list[int], staged: torch.Tensor) -> None:
        """Write this rank's share of ``staged`` (all layers, all KV heads) into ``block_ids``."""
        from fleetlm.disagg.layout import import_blocks, kv_head_range

        r, st = self.runner, self.rank
        import_blocks(r.kv_cache, block_ids, staged, r.layer_ids,
                      kv_head_range(st.tp_rank, st.tp_size, r.cfg.num_kv_heads))

    def comm_stats(self, reset: bool = False) -> dict[str, float]:
        """Seconds inside ``execute_model`` and inside each kind of collective, since the last
        reset (the parallel benchmark's breakdown of a step)."""
        from fleetlm.distributed.communication import COMM_CALLS, COMM_SECONDS

        out = {"step": self.step_seconds, **{k: v for k, v in COMM_SECONDS.items()},
               **{f"{k}_calls": float(v) for k, v in COMM_CALLS.items()}}
        if reset:
            self.step_seconds = 0.0
            COMM_SECONDS.clear()
            COMM_CALLS.clear()
        return out
