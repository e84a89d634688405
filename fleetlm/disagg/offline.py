"""Disaggregated generation with two offline engines (``LLM(kv_transfer_config=...)``): the
producer prefills and samples the first token, the consumer fetches the K/V and decodes.

``generate_disaggregated`` is the offline twin of the router's ``--pd`` flow (tests and
benchmarks use it); ``prefill`` / ``decode`` are its two halves. Request ids are the transfer
ids, so they must be unique per producer while a transfer is staged.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fleetlm.outputs import RequestOutput
from fleetlm.sampling_params import SamplingParams

_ids = itertools.count()


@dataclass(frozen=True)
class PrefillResult:
    """What the producer returns: its first token and the handle the consumer fetches with."""

    request_id: str
    prompt_token_ids: list[int]
    output: RequestOutput
    kv_transfer_params: dict | None  # None when there is nothing to decode (EOS, max_tokens 1, error)


def _submit(llm, prompt_ids: list[int], sp: SamplingParams, params: dict, rid: str) -> None:
    eng = llm.engine
    reqs = eng.make_requests(rid, prompt_ids, sp)
    for r in reqs:
        r.kv_transfer_params = params
    eng.output_processor.add(rid, None, prompt_ids, sp, [r.request_id for r in reqs], time.monotonic())
    eng.client.add_requests(reqs)


def _run(llm, rids: list[str]) -> dict[str, RequestOutput]:
    eng, done = llm.engine, {}
    try:
        while eng.has_unfinished_requests() and len(done) < len(rids):
            for out in eng.step():
                done[out.request_id] = out
    except BaseException:
        for rid in rids:
            eng.abort_request(rid)
        raise
    return done


def prefill(producer, prompts: Sequence[list[int]], sp: SamplingParams) -> list[PrefillResult]:
    """Prefill every prompt on ``producer`` (max one token); handles for those that go on."""
    address = producer.engine.args.kv_transfer_config.public_address
    rids = [f"pd-{next(_ids)}-{time.monotonic_ns()}" for _ in prompts]
    for rid, p in zip(rids, prompts):
        _submit(producer, list(p), replace(sp, max_tokens=1, n=1), {"do_remote_decode": True}, rid)
    outs = _run(producer, rids)
    results = []
    for rid, p in zip(rids, prompts):
        o = outs[rid]
        c = o.outputs[0]
        goes_on = o.error is None and c.finish_reason == "length" and (sp.max_tokens or 16) > 1
        params = {"remote_address": address, "transfer_id": rid} if goes_on else None
        results.append(PrefillResult(rid, list(p), o, params))
    return results


def decode(consumer, prefilled: Sequence[PrefillResult], sp: SamplingParams) -> list[list[int] | str]:
    """Decode after each prefill: the generated token ids (first token included), or the error."""
    rids, out = [], []
    for pr in prefilled:
        if pr.kv_transfer_params is None:
            continue
        rid = f"{pr.request_id}-d"
        first = pr.output.outputs[0].token_ids[0]
        _submit(consumer, pr.prompt_token_ids + [first], replace(sp, max_tokens=(sp.max_tokens or 16) - 1),
                pr.kv_transfer_params, rid)
        rids.append(rid)
    outs = _run(consumer, rids)
    for pr in prefilled:
        o, c = pr.output, pr.output.outputs[0]
        if pr.kv_transfer_params is None:
            out.append(o.error if o.error else list(c.token_ids))
            continue
        d = outs[f"{pr.request_id}-d"]
        out.append(d.error if d.error else [c.token_ids[0], *d.outputs[0].token_ids])
    return out


def generate_disaggregated(producer, consumer, prompts: Sequence[list[int]], sp: SamplingParams) -> list[list[int] | str]:
    return decode(consumer, prefill(producer, prompts, sp), sp)
