"""The HTTP side of disaggregated serving, on ``/v1/completions`` and ``/v1/chat/completions``
(``fleetlm serve --kv-transfer-config``).

Prefill worker (producer): a request with ``"kv_transfer_params": {"do_remote_decode": true}``
and ``max_tokens: 1`` runs the prefill and samples the first token; the response carries
``kv_transfer_params = {"remote_address", "transfer_id", "do_remote_prefill": true,
"first_token_id"}`` — the handle — or null when there is nothing to decode (EOS came first).

Decode worker (consumer): a request with the handle as its ``kv_transfer_params`` and the same
prompt. The front end looks the handle up at the producer before admitting anything: an unknown
or expired handle is a 404 naming it, a producer this worker may not fetch from or whose
engine differs is a 400 naming the difference, an unreachable one a 503. The engine request's
prompt is the producer's prompt plus its first token, so the response holds the tokens *after*
the first one (``max_tokens`` counts those).

A chat request works the same way: the decode worker renders the same conversation, which must
give the producer's prompt; ``tools`` are refused on this path (the tool-call parser would see
the answer without its first token).
"""

from __future__ import annotations

import asyncio

from fleetlm.disagg.config import KVTransferConfig
from fleetlm.disagg.connector import check_transfer_params
from fleetlm.disagg.meta import HandshakeError, UnknownHandle
from fleetlm.entrypoints.openai.protocol import APIError, bad_request

PARAM = "kv_transfer_params"


class DisaggFrontend:
    def __init__(self, config: KVTransferConfig | None, model_config, block_size_fn) -> None:
        self.config = config
        self.model_config = model_config
        self.block_size_fn = block_size_fn  # the engine's block size, once it has started
        self._client = None

    def side(self, params: dict | None) -> str | None:
        """``producer`` / ``consumer`` / None, after checking the params against this server (400)."""
        if params is None:
            return None
        try:
            side = check_transfer_params(params)
        except ValueError as e:
            raise bad_request(str(e), PARAM) from None
        cfg = self.config
        if cfg is None:
            raise bad_request("kv_transfer_params: this server was started without --kv-transfer-config", PARAM)
        if side == "producer" and not cfg.is_producer:
            raise bad_request(f"kv_transfer_params.do_remote_decode: this server is a K/V {cfg.role}, not a producer",
                              PARAM)
        if side == "consumer" and not cfg.is_consumer:
            raise bad_request(f"kv_transfer_params.remote_address: this server is a K/V {cfg.role}, not a consumer",
                              PARAM)
        return side

    def check_prefill(self, req, limit: int | None, one_prompt: bool) -> None:
        if limit != 1:
            raise bad_request(f"a prefill for remote decode (kv_transfer_params.do_remote_decode) must have "
                              f"max_tokens = 1, got {limit}", "max_tokens")
        if req.n != 1 or req.stream or not one_prompt:
            raise bad_request("a prefill for remote decode takes one prompt, n = 1 and stream = false", PARAM)

    def handle(self, response: dict, engine_request_id: str) -> dict | None:
        """The handle a successful prefill response carries (None: nothing to decode)."""
        choice = response["choices"][0]
        if choice["finish_reason"] != "length":
            return None
        return {"remote_address": self.config.public_address, "transfer_id": engine_request_id,
                "do_remote_prefill": True}

    async def resolve(self, req, own_prompt_ids: list[int]) -> list[int]:
        """The engine prompt of a remote-prefilled request: the producer's prompt + first token."""
        if req.n != 1:
            raise bad_request("a decode after a remote prefill takes one prompt and n = 1", PARAM)
        p = req.kv_transfer_params
        try:
            meta = await asyncio.to_thread(self._lookup, p["remote_address"], p["transfer_id"])
        except UnknownHandle:
            raise APIError(404, f"kv_transfer_params.transfer_id {p['transfer_id']!r}: no such K/V transfer at "
                                f"{p['remote_address']} (unknown, expired or already used)", param=f"{PARAM}.transfer_id",
                           code="kv_transfer_not_found") from None
        except HandshakeError as e:
            raise bad_request(str(e), f"{PARAM}.remote_address") from None
        except ConnectionError as e:
            raise APIError(503, str(e), type="service_unavailable", code="kv_producer_unreachable") from None
        self._check_engine(meta.engine)
        if own_prompt_ids not in (meta.token_ids, meta.token_ids + [meta.first_token_id]):
            raise bad_request("the prompt differs from the prompt of the transferred K/V (kv_transfer_params)",
                              "prompt")
        return meta.token_ids + [meta.first_token_id]

    def _lookup(self, producer: str, transfer_id: str):
        from fleetlm.disagg.client import KVClient

        if producer not in self.config.allowed_producers():
            raise HandshakeError(f"kv_transfer_params.remote_address {producer!r} is not in this server's "
                                 f"kv_transfer_config.producers ({', '.join(self.config.allowed_producers())})")
        if self._client is None:
            self._client = KVClient(None, None, self.config.allowed_producers(), self.config.fetch_timeout_s)
        return self._client.lookup_only(producer, transfer_id)

    def _check_engine(self, eng) -> None:
        c = self.model_config
        mine = {"architecture": c.architecture, "num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads,
                "block_size": self.block_size_fn()}
        for k, v in mine.items():
            if getattr(eng, k) != v:
                raise bad_request(f"kv transfer handshake failed: producer and consumer disagree on "
                                  f"{k.replace('_', ' ')}: producer {getattr(eng, k)!r}, consumer {v!r}",
                                  f"{PARAM}.remote_address")


def _single_prompt(prompt) -> bool:
    return isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int))


def frontend_for(engine) -> DisaggFrontend:
    """The server's ``DisaggFrontend`` (``engine``: its ``AsyncLLM``)."""
    return DisaggFrontend(engine.args.kv_transfer_config, engine.model_config, lambda: engine.cache_config.block_size)


async def completion(front: DisaggFrontend, req, generate, serving):
    """``/v1/completions`` with ``kv_transfer_params``: ``generate(req)`` is the plain route."""
    side = front.side(req.kv_transfer_params)
    if side == "producer":
        front.check_prefill(req, req.max_tokens, _single_prompt(req.prompt))
        out = await generate(req)
        if isinstance(out, dict):
            out["kv_transfer_params"] = front.handle(out, f"{out['id']}-0")
        return out
    if req.echo or not _single_prompt(req.prompt):
        raise bad_request("a decode after a remote prefill takes one prompt and echo = false", PARAM)
    own = serving.completion_prompts(req)[0][1]
    ids = await front.resolve(req, own)
    return await generate(req.model_copy(update={"prompt": ids}))


async def chat(front: DisaggFrontend, req, generate, handler):
    """``/v1/chat/completions`` with ``kv_transfer_params``: ``generate(handler, req)`` is the
    plain route; the decode side runs it with the transferred prompt."""
    side = front.side(req.kv_transfer_params)
    if req.calls_tools:
        raise bad_request("tools are not supported with kv_transfer_params (disaggregated serving) yet", "tools")
    if side == "producer":
        front.check_prefill(req, req.limit, True)
        out = await generate(handler, req)
        if isinstance(out, dict):
            out["kv_transfer_params"] = front.handle(out, out["id"])
        return out
    ids = await front.resolve(req, handler.prompt(req)[1])
    return await generate(_WithPrompt(handler, ids), req)


class _WithPrompt:
    """A chat handler whose engine prompt is given (the producer's prompt + first token)."""

    def __init__(self, handler, prompt_ids: list[int]) -> None:
        self.handler, self.prompt_ids = handler, prompt_ids

    def prepare(self, req, arrival: float):
        return self.handler.prepare(req, arrival, prompt_ids=self.prompt_ids)

    def __getattr__(self, name: str):
        return getattr(self.handler, name)
