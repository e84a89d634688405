"""``fleetlm serve``: the FastAPI app and its life cycle.

States: loading (503 everywhere but the health probes and /metrics, which say so) -> ready ->
draining (after SIGTERM/SIGINT: new requests get 503, in-flight ones finish up to
--shutdown-timeout, then the rest are aborted and the process exits 0). If the engine process
dies, requests and both probes get 503 instead of hanging. Probes: see ``server_state``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fleetlm import __version__
from fleetlm.config import EngineArgs
from fleetlm.disagg.http import chat as disagg_chat
from fleetlm.disagg.http import completion as disagg_completion
from fleetlm.disagg.http import frontend_for
from fleetlm.engine.async_llm import AsyncLLM
from fleetlm.entrypoints.openai.errors import install_error_handlers
from fleetlm.entrypoints.openai.http_protocol import GuardedH11Protocol
from fleetlm.entrypoints.openai.lora_routes import install_lora_routes, model_cards, resolve_model
from fleetlm.entrypoints.openai.middleware import GuardMiddleware
from fleetlm.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from fleetlm.entrypoints.openai.server_state import (
    LIVENESS_PATH,
    READINESS_PATH,
    ServerConfig,
    ServerState,
)
from fleetlm.entrypoints.openai.serving import (
    ADAPTER,
    ClientGone,
    OpenAIServing,
    close_all,
    engine_error,
    render_chat,
    run_cancellable,
    safe_encode,
)
from fleetlm.entrypoints.openai.serving_chat import ChatHandler
from fleetlm.entrypoints.openai.serving_completion import CompletionHandler
from fleetlm.entrypoints.openai.sse import SSEResponse
from fleetlm.metrics.prometheus import PrometheusMetrics
from fleetlm.tenancy.admission import CURRENT, TENANT_SCOPE_KEY
from fleetlm.tenancy.server import install_tenants, request_context, tenant_gate

__all__ = ["ServerConfig", "ServerState", "build_app", "serve"]

logger = logging.getLogger("fleetlm")


def build_app(state: ServerState):
    docs = state.config.enable_docs
    app = FastAPI(title="fleetlm", version=__version__, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    serving = OpenAIServing(state.engine, state.model_name)
    serving.gate = tenant_gate(state)  # quotas, salts and per-tenant metrics (fleetlm/tenancy)
    completions, chat = CompletionHandler(serving), ChatHandler(serving)

    install_error_handlers(app, state.config.max_request_body_bytes)

    def check_model(model: str | None) -> str | None:
        return resolve_model(state, model)  # the LoRA adapter it names, or None; 404 if unknown

    async def generate(handler, req, request: Request):
        arrival = time.monotonic()
        lora = check_model(req.model)
        if req.user:
            logger.info("request from user %r", req.user)
        ctx = request_context(state.tenants, request.scope.get(TENANT_SCOPE_KEY), req.priority, req.cache_salt)
        token, adapter = CURRENT.set(ctx), ADAPTER.set(lora)
        try:
            rid, prepared, streams = handler.prepare(req, arrival)
        except Exception as e:
            raise engine_error(e) from None
        finally:
            CURRENT.reset(token)
            ADAPTER.reset(adapter)
        if req.stream:
            return SSEResponse(handler.stream(req, rid, prepared, streams), on_close=lambda: close_all(streams))
        try:
            return await run_cancellable(handler.full(req, rid, prepared, streams), request.receive)
        except ClientGone:
            return Response(status_code=499)
        except Exception as e:
            raise engine_error(e) from None
        finally:  # also if the task was cancelled before it started: nothing stays in the engine
            close_all(streams)

    disagg = frontend_for(state.engine)  # --kv-transfer-config (fleetlm/disagg/http.py)

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, request: Request):
        if req.kv_transfer_params is not None:
            return await disagg_completion(disagg, req, lambda r: generate(completions, r, request), serving)
        return await generate(completions, req, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, request: Request):
        if req.kv_transfer_params is not None:
            return await disagg_chat(disagg, req, lambda h, r: generate(h, r, request), chat)
        return await generate(chat, req, request)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": model_cards(state)}

    install_lora_routes(app, state)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        tok = state.engine.tokenizer
        if req.messages is not None:
            text = render_chat(tok, req.messages, req.add_generation_prompt)
            ids = safe_encode(tok, text, "messages", add_special_tokens=False)
        else:
            ids = safe_encode(tok, req.prompt, "prompt", add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        vocab = state.engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"invalid token id(s) {bad[:5]} (vocab size {vocab})", param="tokens")
        return {"prompt": state.engine.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.get(LIVENESS_PATH)
    async def health():
        ok, why = await state.live()
        return JSONResponse({"status": why}, status_code=200 if ok else 503)

    @app.get(READINESS_PATH)
    async def ready():
        ok, why = await state.readiness()
        return JSONResponse({"status": why}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    return GuardMiddleware(app, api_keys=list(state.config.api_keys), metrics_public=state.config.metrics_public,
                           max_body_bytes=state.config.max_request_body_bytes, gate=state.gate,
                           on_status=lambda s: state.metrics.on_http_response(s),
                           over_connection_limit=state.over_connection_limit,
                           authenticate=state.tenants.authenticate if state.tenants is not None else None)


async def serve(args: EngineArgs, config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT (then drain) or until the engine cannot start. Returns the exit code."""
    name = config.served_model_name or args.model
    metrics = PrometheusMetrics(name)
    engine = AsyncLLM(args, max_queued_requests=config.max_queued_requests,
                      max_queued_tokens=config.max_queued_tokens, request_timeout=config.request_timeout,
                      stats_sink=metrics)
    state = ServerState(config, engine, metrics, name)
    install_tenants(state)  # --tenants: registry, per-tenant metrics, SIGHUP reload
    app = build_app(state)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                        timeout_graceful_shutdown=5, lifespan="off", http=GuardedH11Protocol,
                        timeout_keep_alive=config.timeout_keep_alive)
    server = DrainingServer(uv, state)
    state.connection_count = lambda: len(server.server_state.connections)
    serve_task = asyncio.create_task(server.serve())
    try:
        await engine.start()
        state.ready = True
        logger.info("serving %s on http://%s:%d (engine core pid %s)", name, config.host, config.port,
                    engine.engine_pid)
    except Exception as e:
        state.load_error = str(e)
        logger.error("%s", e)
        server.should_exit = True
    await serve_task
    await engine.shutdown()
    return 1 if state.load_error else 0


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: drain (503 for new work), then exit; a second one exits now."""

    def __init__(self, config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining or not self.state.ready:
            return super().handle_exit(sig, frame)
        self.state.draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        eng, timeout = self.state.engine, self.state.config.shutdown_timeout
        logger.info("draining: %d request(s) in flight, up to %.0f s", eng.num_inflight, timeout)
        deadline = time.monotonic() + timeout
        while eng.num_inflight and time.monotonic() < deadline and eng.dead_reason is None:
            await asyncio.sleep(0.05)
        if eng.num_inflight:
            logger.warning("shutdown timeout: aborting %d request(s)", eng.num_inflight)
            eng.fail_all("the server shut down before this request finished")
            await asyncio.sleep(0.2)  # let handlers send their error bodies
        self.should_exit = True
