"""``KVConnector``: the engine core's door to disaggregated prefill and decode.

Roles (``kv_transfer_config.role``), as vLLM readers know them:

- **producer** — a request with ``kv_transfer_params = {"do_remote_decode": true}`` (and
  ``max_tokens = 1``) runs its prefill here and samples its first token. When it finishes, before
  its blocks go back to the pool, ``KVProducer`` copies their K/V (every layer, K and V, all KV
  heads) into the transport's staging area under the request id, with the prompt's stable block
  hashes and the engine fingerprint (``meta.py``). The blocks are freed at once; the staged copy
  lives until the consumer releases it or ``handle_ttl_s`` passes.
- **consumer** — a request with ``kv_transfer_params = {"remote_address", "transfer_id"}`` and
  prompt = the producer's prompt + its first token. ``KVConsumer`` puts it in ``WAITING_FOR_KV``
  (known to the scheduler, outside its queue), allocates its blocks (its own prefix-cache hits
  first: only the blocks after them are fetched), and fetches on a background thread while the
  engine keeps stepping the other requests. Between steps it writes what arrived into the paged
  cache (each rank its layers and KV heads), offers the full blocks to the prefix cache, sets
  ``num_computed_tokens`` to the prompt's length and hands the request to the running list.
  A fetch that fails or expires ends the request with an error; an abort at any point frees its
  blocks (the fetch result is dropped when it comes).
- **both** — one engine does either, per request.

Hot path: with no ``kv_transfer_config`` the engine holds ``kv_connector = None`` and checks it
once per step and once per added request.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from dataclasses import dataclass, field

import torch

from fleetlm.core.sched_output import EngineCoreOutput
from fleetlm.disagg.client import KVClient
from fleetlm.disagg.config import KVTransferConfig
from fleetlm.disagg.layout import merge_rank_exports
from fleetlm.disagg.meta import EngineFingerprint, TransferMeta
from fleetlm.disagg.server import KVOutbox, KVServer
from fleetlm.disagg.transports import make_transport
from fleetlm.request import Request, RequestStatus

logger = logging.getLogger("fleetlm")

IDLE_WAIT_S = 0.005  # an engine with only transfers in progress waits this long per step


def check_transfer_params(params: dict) -> str:
    """``producer`` or ``consumer``: which side a request's ``kv_transfer_params`` ask for."""
    if not isinstance(params, dict):
        raise ValueError(f"kv_transfer_params must be an object, got {type(params).__name__}")
    if params.get("do_remote_decode"):
        extra = sorted(set(params) - {"do_remote_decode"})
        if extra:
            raise ValueError(f"kv_transfer_params: unknown key(s) {', '.join(extra)} with do_remote_decode")
        return "producer"
    missing = [k for k in ("remote_address", "transfer_id") if not isinstance(params.get(k), str)]
    if missing:
        raise ValueError(f"kv_transfer_params needs do_remote_decode=true (prefill here) or remote_address and "
                         f"transfer_id (decode after a remote prefill); missing: {', '.join(missing)}")
    extra = sorted(set(params) - {"remote_address", "transfer_id", "do_remote_prefill"})
    if extra:
        raise ValueError(f"kv_transfer_params: unknown key(s) {', '.join(extra)}")
    return "consumer"


class KVConnector:
    def __init__(self, config: KVTransferConfig, core) -> None:
        self.config = config
        self.core = core
        self.engine = EngineFingerprint(**core.executor.collective_rpc("kv_fingerprint")[0])
        self.transport = make_transport(config.transport)
        self.producer = KVProducer(self) if config.is_producer else None
        self.consumer = KVConsumer(self) if config.is_consumer else None

    @property
    def role(self) -> str:
        return self.config.role

    def add_request(self, req: Request) -> None:
        side = check_transfer_params(req.kv_transfer_params)
        if side == "producer":
            if self.producer is None:
                raise ValueError("kv_transfer_params.do_remote_decode: this engine is not a K/V producer "
                                 f"(kv_transfer_config.role is {self.role!r})")
            if req.max_tokens != 1:
                raise ValueError(f"a prefill for remote decode must have max_tokens = 1, got {req.max_tokens}")
            self.core.scheduler.add_request(req)
        else:
            if self.consumer is None:
                raise ValueError("kv_transfer_params.remote_address: this engine is not a K/V consumer "
                                 f"(kv_transfer_config.role is {self.role!r})")
            self.consumer.add(req)

    def poll(self) -> None:
        if self.consumer is not None:
            self.consumer.poll()

    def fix_outputs(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        if self.producer is not None and self.producer.failed:
            self.producer.fix_outputs(outputs)
        return outputs

    def has_pending(self) -> bool:
        return self.consumer is not None and self.consumer.has_pending()

    def stats(self) -> dict:
        out = {"role": self.role, "transport": self.transport.name, **self.transport.stats.as_dict()}
        if self.producer is not None:
            out |= self.producer.stats()
        if self.consumer is not None:
            out |= self.consumer.stats()
        return out

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
        if self.consumer is not None:
            self.consumer.close()
        self.transport.close()


class KVProducer:
    def __init__(self, conn: KVConnector) -> None:
        cfg = conn.config
        self.conn = conn
        self.outbox = KVOutbox(conn.transport, cfg.handle_ttl_s, cfg.max_staged_bytes)
        self.server = KVServer(cfg.address, self.outbox, conn.engine, cfg.public_address)
        self.failed: dict[str, str] = {}  # request id -> why staging failed (reported in its output)
        self.num_staged = 0
        self.stage_seconds = 0.0
        conn.core.scheduler.on_finish = self.request_finished

    def request_finished(self, req: Request, status: RequestStatus) -> None:
        """Called before ``req``'s blocks are freed: stage its prompt K/V if it asked for it."""
        p = req.kv_transfer_params
        if p is None or not p.get("do_remote_decode") or status != RequestStatus.FINISHED_LENGTH:
            return  # aborted, failed, or ended on EOS: there is nothing to decode
        try:
            self.stage(req)
        except Exception as e:  # noqa: BLE001 - this request fails alone
            logger.warning("request %s: staging its K/V failed: %s", req.request_id, e)
            self.failed[req.request_id] = f"staging the K/V for remote decode failed: {e}"

    def stage(self, req: Request) -> TransferMeta:
        t0 = time.perf_counter()
        core, eng = self.conn.core, self.conn.engine
        bs, n_prompt = eng.block_size, req.num_prompt_tokens
        n_blocks = -(-n_prompt // bs)
        block_ids = core.scheduler.kv.block_ids(req.request_id)[:n_blocks]
        core.scheduler.kv._update_hashes(req, n_prompt)  # also without prefix caching
        parts = core.executor.collective_rpc("export_kv", block_ids)
        parts = [p for p in parts if p is not None]
        whole = len(parts) == 1 and len(parts[0][0]) == eng.num_layers and len(parts[0][1]) == eng.num_kv_heads
        data = parts[0][2] if whole else merge_rank_exports(parts, eng.num_layers, eng.num_kv_heads)
        flat = data.contiguous().view(torch.uint8).reshape(-1)
        bpb = flat.numel() // max(1, n_blocks)
        meta = TransferMeta(req.request_id, eng, list(req.prompt_token_ids), req.output_token_ids[0],
                            list(req.block_hashes[: n_prompt // bs]), n_blocks, bpb,
                            time.time() + self.conn.config.handle_ttl_s)
        self.outbox.put(meta, self.conn.transport.stage(flat, bpb))
        self.num_staged += 1
        self.stage_seconds += time.perf_counter() - t0
        return meta

    def fix_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        for out in outputs:
            why = self.failed.pop(out.request_id, None)
            if why is not None:
                out.finish_reason, out.error = "error", why

    def stats(self) -> dict:
        return {"staged": self.num_staged, "staged_now": len(self.outbox), "staged_bytes": self.outbox.staged_bytes,
                "expired": self.outbox.num_expired, "stage_seconds": self.stage_seconds}

    def close(self) -> None:
        self.server.close()


@dataclass
class _Incoming:
    req: Request
    producer: str
    transfer_id: str
    num_hit_blocks: int = 0
    future: cf.Future | None = None
    started: float = field(default_factory=time.monotonic)


class KVConsumer:
    def __init__(self, conn: KVConnector) -> None:
        cfg = conn.config
        self.conn = conn
        self.client = KVClient(conn.transport, conn.engine, cfg.allowed_producers(), cfg.fetch_timeout_s)
        self.pool = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-fetch")
        self.to_allocate: list[_Incoming] = []  # admitted, waiting for free blocks (FCFS)
        self.fetching: list[_Incoming] = []
        self.arrived: list[_Incoming] = []  # written, waiting for room in the running list
        self.num_received = self.num_failed = 0
        self.blocks_received = self.blocks_hit = 0

    def add(self, req: Request) -> None:
        p = req.kv_transfer_params
        if req.num_prompt_tokens < 2:
            raise ValueError("a remote-prefilled request's prompt is the producer's prompt plus its first token")
        self.conn.core.scheduler.add_waiting_for_kv(req)
        self.to_allocate.append(_Incoming(req, p["remote_address"], p["transfer_id"]))

    def has_pending(self) -> bool:
        return bool(self.to_allocate or self.fetching or self.arrived)

    def poll(self) -> None:
        self._allocate()
        sched = self.conn.core.scheduler
        if self.fetching and not (sched.waiting or sched.running or self.conn.core.in_flight or self.arrived):
            cf.wait([i.future for i in self.fetching], IDLE_WAIT_S, cf.FIRST_COMPLETED)  # nothing else to do
        still = []
        for inc in self.fetching:
            if inc.future.done():
                self._finish_fetch(inc)
            else:
                still.append(inc)
        self.fetching = still
        self._admit_arrived()

    def _live(self, inc: _Incoming) -> bool:
        return self.conn.core.scheduler.requests.get(inc.req.request_id) is inc.req and not inc.req.is_finished

    def _allocate(self) -> None:
        kv = self.conn.core.scheduler.kv
        while self.to_allocate:
            inc = self.to_allocate[0]
            if not self._live(inc):
                self.to_allocate.pop(0)
                continue
            hits, _ = kv.get_computed_blocks(inc.req)
            if kv.allocate_remote(inc.req, hits, inc.req.num_prompt_tokens - 1) is None:
                return  # FCFS: wait for blocks to free up
            self.to_allocate.pop(0)
            inc.num_hit_blocks = len(hits)
            inc.future = self.pool.submit(self._fetch, inc.producer, inc.transfer_id, len(hits))
            self.fetching.append(inc)

    def _fetch(self, producer: str, transfer_id: str, first_block: int) -> tuple[TransferMeta, torch.Tensor]:
        try:
            return self.client.fetch(producer, transfer_id, first_block)
        finally:
            try:
                self.client.release(producer, transfer_id)
            except Exception:  # noqa: BLE001 - the producer expires it anyway
                pass

    def _finish_fetch(self, inc: _Incoming) -> None:
        if not self._live(inc):
            return  # aborted while fetching: its blocks are already back in the pool
        try:
            meta, data = inc.future.result()
            self._write(inc, meta, data)
        except Exception as e:  # noqa: BLE001 - this request fails alone
            self._fail(inc, f"KV transfer {inc.transfer_id!r} from {inc.producer} failed: {e}")
            return
        self.arrived.append(inc)

    def _write(self, inc: _Incoming, meta: TransferMeta, data: torch.Tensor) -> None:
        req, eng = inc.req, self.conn.engine
        n_prompt = req.num_prompt_tokens - 1
        if meta.token_ids != req.prompt_token_ids[:n_prompt] or meta.first_token_id != req.prompt_token_ids[-1]:
            raise ValueError("the staged K/V is for a different prompt than this request's")
        n = meta.num_blocks - inc.num_hit_blocks
        staged = data.view(_dtype(eng.dtype)).view(n, eng.num_layers, 2, eng.block_size, eng.num_kv_heads,
                                                   eng.head_dim)
        core = self.conn.core
        block_ids = core.scheduler.kv.block_ids(req.request_id)[inc.num_hit_blocks: meta.num_blocks]
        core.executor.collective_rpc("import_kv", block_ids, staged)
        core.scheduler.kv.cache_remote(req, n_prompt)
        self.num_received += 1
        self.blocks_received += n
        self.blocks_hit += inc.num_hit_blocks

    def _admit_arrived(self) -> None:
        sched = self.conn.core.scheduler
        while self.arrived and len(sched.running) < sched.config.max_num_seqs:
            inc = self.arrived.pop(0)
            if self._live(inc):
                sched.kv_arrived(inc.req, inc.req.num_prompt_tokens - 1, inc.num_hit_blocks * self.conn.engine.block_size)

    def _fail(self, inc: _Incoming, why: str) -> None:
        logger.warning("request %s: %s", inc.req.request_id, why)
        self.num_failed += 1
        self.conn.core.scheduler.finish_requests([inc.req.request_id], RequestStatus.FINISHED_ERROR)
        self.conn.core._deferred.append(EngineCoreOutput(inc.req.request_id, [], "error", error=why))

    def stats(self) -> dict:
        return {"received": self.num_received, "failed": self.num_failed, "blocks_received": self.blocks_received,
                "blocks_hit": self.blocks_hit, "waiting_for_kv": len(self.to_allocate) + len(self.fetching)}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.partition("/")[0])  # "uint8/int8": the cache's storage dtype
