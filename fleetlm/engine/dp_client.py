"""Internal data parallelism: N engine cores (each its own process and KV cache) behind one
front end, balanced with the router's policies (``fleetlm/router/policies.py``).

- ``DPAsyncMPClient`` (the server's ``AsyncLLM``): N ``AsyncMPClient``s; the same interface as
  one, so ``AsyncLLM`` does not know how many cores there are.
- ``DPSyncClient`` (offline ``LLM``): N core processes driven over plain ZMQ; ``step()`` returns
  whatever any core produced.

Both route through ``DPBalancer``: all samples of one request go to one core (they share its
prompt blocks); the policy sees per-core requests in flight and KV usage; ``prefix`` keeps an
approximate radix tree of the token ids sent to each core. Facts: ``max_model_len`` is the
cores' and ``cache_config`` is ONE core's (a request must fit on the core it goes to).
Invariant: a request id maps to its core from add until its final output or abort.
"""

from __future__ import annotations

import dataclasses
import os

from fleetlm.config import CacheConfig, EngineArgs
from fleetlm.core.kv_events import offset_endpoint
from fleetlm.engine.core_proc import AbortRequests, AddRequests, CoreOutputs, Failed
from fleetlm.metrics.stats import SchedulerStats
from fleetlm.router.policies import PolicyConfig, RouteKey, make_policy


def core_args(args: EngineArgs, i: int) -> EngineArgs:
    """Core ``i``'s arguments: one core's share of the CPU threads, its own KV-events endpoint."""
    threads = args.num_threads
    if threads is None and args.resolved_device == "cpu":
        threads = max(1, len(os.sched_getaffinity(0)) // args.data_parallel_size)
    ep = None if args.kv_events_endpoint is None else offset_endpoint(args.kv_events_endpoint, i)
    return dataclasses.replace(args, data_parallel_size=1, num_threads=threads, kv_events_endpoint=ep)


@dataclasses.dataclass
class CoreView:
    name: str
    in_flight: int = 0
    kv_usage: float = 0.0


def merge_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """Counters and gauges summed over cores; KV usage weighted by each core's blocks."""
    sums = {f.name: _merge([getattr(s, f.name) for s in stats]) for f in dataclasses.fields(SchedulerStats)}
    blocks = sums["num_blocks"]
    sums["kv_cache_usage"] = (sum(s.kv_cache_usage * s.num_blocks for s in stats) / blocks) if blocks else 0.0
    return SchedulerStats(**sums)


def _merge(values: list):
    """Numbers add up; per-key dicts (e.g. per tenant) per key; tuples (per position) per
    position; None stays None."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], dict):
        out: dict = {}
        for d in present:
            for k, v in d.items():
                out[k] = out.get(k, 0) + v
        return out
    if isinstance(present[0], tuple | list):
        width = max(len(t) for t in present)
        return tuple(sum(t[k] for t in present if k < len(t)) for k in range(width))
    return sum(present)


class DPBalancer:
    def __init__(self, n: int, policy: str, seed: int = 0) -> None:
        self.views = [CoreView(f"core{i}") for i in range(n)]
        self.policy = make_policy(policy, PolicyConfig(seed=seed))
        self.owner: dict[str, int] = {}  # core request id -> core index
        self.stats = [SchedulerStats() for _ in range(n)]
        self.uses_prefix = policy == "prefix"

    def route_add(self, msg: AddRequests) -> int:
        key = RouteKey(prefix=tuple(msg.requests[0].prompt_token_ids)) if self.uses_prefix else RouteKey()
        d = self.policy.choose(key, self.views)
        self.policy.on_routed(key, d.replica)
        i = self.views.index(d.replica)
        for r in msg.requests:
            self.owner[r.request_id] = i
        d.replica.in_flight += len(msg.requests)
        return i

    def route_abort(self, ids: list[str]) -> dict[int, list[str]]:
        """Core -> ids to abort there; an aborted request leaves its core's count now (the core
        may send no final output for it)."""
        per: dict[int, list[str]] = {}
        for rid in ids:
            i = self.owner.pop(rid, None)
            if i is not None:
                per.setdefault(i, []).append(rid)
                self.views[i].in_flight -= 1
        return per

    def on_outputs(self, i: int, msg: CoreOutputs) -> CoreOutputs:
        """Account core ``i``'s outputs; returns them with stats merged over every core."""
        for o in msg.outputs:
            if o.finished and self.owner.pop(o.request_id, None) is not None:
                self.views[i].in_flight -= 1
        self.stats[i] = msg.stats
        self.views[i].kv_usage = msg.stats.kv_cache_usage
        return CoreOutputs(msg.outputs, merge_stats(self.stats))


class _Encoded(bytes):
    """Encoded bytes that remember their message, so ``send_encoded`` can route them."""

    msg: object


class DPAsyncMPClient:
    """Same calls as ``AsyncMPClient``; one per core underneath."""

    def __init__(self, args: EngineArgs, log_level: int) -> None:
        from fleetlm.engine.core_client import AsyncMPClient

        self.args = args
        self.clients = [AsyncMPClient(core_args(args, i), log_level) for i in range(args.data_parallel_size)]
        self.balancer = DPBalancer(len(self.clients), args.data_parallel_policy, args.seed)
        self._next = 0

    async def start(self) -> None:
        import asyncio

        results = await asyncio.gather(*(c.start() for c in self.clients), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.shutdown()
            raise errors[0]
        self.max_model_len = min(c.max_model_len for c in self.clients)
        c0 = min((c.cache_config for c in self.clients), key=lambda c: c.num_blocks)
        self.cache_config = CacheConfig(c0.block_size, c0.num_blocks, c0.enable_prefix_caching)

    def encode_add(self, reqs, arrival: float) -> AddRequests:
        return self.clients[0].encode_add(reqs, arrival)

    def encode(self, msg) -> bytes:
        out = _Encoded(self.clients[0].encode(msg))
        out.msg = msg
        return out

    def send_encoded(self, data: bytes) -> None:
        msg = data.msg
        if isinstance(msg, AddRequests) and msg.requests:
            self.clients[self.balancer.route_add(msg)].send_encoded(data)
        elif isinstance(msg, AbortRequests):
            for i, ids in self.balancer.route_abort(msg.request_ids).items():
                self.clients[i].send_encoded(self.clients[i].encode(AbortRequests(ids)))
        else:  # a ping (empty batch) or shutdown: every core
            for c in self.clients:
                c.send_encoded(data)

    def add_requests(self, reqs, arrival: float = 0.0) -> None:
        self.send_encoded(self.encode(self.encode_add(reqs, arrival)))

    def add_lora(self, name: str, path: str) -> None:  # every core (send_encoded broadcasts it)
        from fleetlm.engine.core_proc import AddLoRA

        self.send_encoded(self.encode(AddLoRA(name, path)))

    def remove_lora(self, name: str) -> None:
        from fleetlm.engine.core_proc import RemoveLoRA

        self.send_encoded(self.encode(RemoveLoRA(name)))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.send_encoded(self.encode(AbortRequests(request_ids)))

    async def get_output(self, poll_ms: int = 250):
        """The next message of any core (round-robin fairness); a ``Failed`` of one is the end
        of all (the front end fails every request and reports the server dead)."""
        import zmq
        import zmq.asyncio

        poller = zmq.asyncio.Poller()
        for c in self.clients:
            poller.register(c._out, zmq.POLLIN)
        ready = dict(await poller.poll(poll_ms))
        n = len(self.clients)
        for k in range(n):
            i = (self._next + k) % n
            if self.clients[i]._out in ready:
                self._next = i + 1
                msg = self.clients[i]._dec.decode(await self.clients[i]._out.recv())
                if isinstance(msg, Failed):
                    return Failed(f"data-parallel core {i}: {msg.error}")
                return self.balancer.on_outputs(i, msg) if isinstance(msg, CoreOutputs) else None
        return None

    def exit_code(self) -> int | None:
        for c in self.clients:
            if (code := c.exit_code()) is not None:
                return code
        return None

    @property
    def pid(self) -> int | None:
        return self.clients[0].pid

    @property
    def pids(self) -> list[int | None]:
        return [c.pid for c in self.clients]

    async def shutdown(self) -> None:
        import asyncio

        await asyncio.gather(*(c.shutdown() for c in self.clients), return_exceptions=True)
