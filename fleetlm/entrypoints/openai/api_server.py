"""``fleetlm serve``: the FastAPI app and its life cycle.

States: loading (503 everywhere but /health and /metrics, which say so) -> ready -> draining
(after SIGTERM/SIGINT: new requests get 503, in-flight ones finish up to --shutdown-timeout,
then the rest are aborted and the process exits 0). If the engine process dies, requests and
/health get 503 instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetlm.config import EngineArgs
from fleetlm.engine.async_llm import AsyncLLM
from fleetlm.entrypoints.openai.middleware import BodyTooLarge, GuardMiddleware
from fleetlm.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from fleetlm.entrypoints.openai.serving import (
    ClientGone,
    OpenAIServing,
    close_all,
    engine_error,
    run_cancellable,
    safe_encode,
)
from fleetlm.entrypoints.openai.serving_chat import ChatHandler
from fleetlm.entrypoints.openai.serving_completion import CompletionHandler
from fleetlm.entrypoints.openai.sse import SSEResponse
from fleetlm.metrics.prometheus import PrometheusMetrics
from fleetlm.sampling_params import SamplingParams

logger = logging.getLogger("fleetlm")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_keys: tuple[str, ...] = ()
    metrics_public: bool = False
    max_request_body_bytes: int = 1 << 20
    max_queued_requests: int | None = None
    max_queued_tokens: int | None = None
    request_timeout: float | None = None
    shutdown_timeout: float = 30.0
    health_timeout: float = 30.0


@dataclass
class ServerState:
    config: ServerConfig
    engine: AsyncLLM
    metrics: PrometheusMetrics
    model_name: str
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    _health: asyncio.Task | None = field(default=None, repr=False)

    def gate(self, path: str) -> tuple[int, str, str] | None:
        """Why a request to ``path`` must be refused now (status, message, code), or None."""
        if path in ("/health", "/metrics"):
            return None
        if self.load_error is not None:
            return 503, f"the model failed to load: {self.load_error}", "load_failed"
        if not self.ready:
            return 503, "the model is still loading", "loading"
        if self.draining:
            return 503, "the server is shutting down", "draining"
        if self.engine.dead_reason is not None:
            return 503, f"the engine is not available: {self.engine.dead_reason}", "engine_dead"
        return None

    async def health(self) -> tuple[bool, str]:
        """A real one-token generation (concurrent probes share one)."""
        refusal = self.gate("/v1/models")
        if refusal is not None:
            return False, refusal[1]
        if self._health is None or self._health.done():
            self._health = asyncio.create_task(self._probe())
        try:
            return await asyncio.shield(self._health)
        except Exception as e:
            return False, f"{type(e).__name__}: {e}"

    async def _probe(self) -> tuple[bool, str]:
        eng = self.engine
        ids = eng.tokenizer.encode("ok", add_special_tokens=False)[:1] or [0]
        rs = eng.add_request(f"health-{time.monotonic_ns()}", None, ids, SamplingParams(max_tokens=1, temperature=0),
                             record=False, admit=False, timeout=self.config.health_timeout)
        async for out in rs:
            if out.finished:
                ok = out.error is None and len(out.outputs[0].token_ids) == 1
                return ok, "ok" if ok else f"generation failed: {out.error}"
        return False, "no output"


def build_app(state: ServerState):
    app = FastAPI(title="fleetlm", version="0.1.0")
    serving = OpenAIServing(state.engine, state.model_name)
    completions, chat = CompletionHandler(serving), ChatHandler(serving)

    def error_response(e: APIError) -> Response:
        # ensure_ascii: a message may quote input holding lone surrogates
        return Response(json.dumps(e.body()), status_code=e.status, headers=e.headers, media_type="application/json")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        return error_response(validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        if isinstance(e, BodyTooLarge):
            return error_response(APIError(413, f"request body exceeds {state.config.max_request_body_bytes} bytes",
                                           code="body_too_large"))
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return error_response(APIError(e.status_code, str(e.detail), type=kind, headers=dict(e.headers or {})))

    def check_model(model: str | None) -> None:
        if model is not None and model != state.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{state.model_name}'",
                           param="model", code="model_not_found")

    async def generate(handler, req, request: Request):
        arrival = time.monotonic()
        check_model(req.model)
        if req.user:
            logger.info("request from user %r", req.user)
        try:
            rid, prepared, streams = handler.prepare(req, arrival)
        except Exception as e:
            raise engine_error(e) from None
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

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, request: Request):
        return await generate(completions, req, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, request: Request):
        return await generate(chat, req, request)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "fleetlm", "max_model_len": state.engine.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        tok = state.engine.tokenizer
        if req.messages is not None:
            text = tok.apply_chat_template([m.as_dict() for m in req.messages], req.add_generation_prompt)
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

    @app.get("/health")
    async def health():
        ok, why = await state.health()
        return Response(status_code=200) if ok else JSONResponse({"status": why}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        from fleetlm import __version__

        return {"version": __version__}

    return GuardMiddleware(app, api_keys=list(state.config.api_keys), metrics_public=state.config.metrics_public,
                           max_body_bytes=state.config.max_request_body_bytes, gate=state.gate,
                           on_status=lambda s: state.metrics.on_http_response(s))


def validation_error(e) -> APIError:
    """Pydantic's complaint as one 400 naming the parameter."""
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        from fleetlm.entrypoints.openai.protocol import UNSUPPORTED

        why = "is not supported by this server" if loc and loc[-1] in UNSUPPORTED else "is not a known parameter"
        return APIError(400, f"parameter '{param}' {why}", param=param, code="unsupported_parameter")
    if first.get("type") == "missing":
        if param is None:
            return APIError(400, "the request body must be a JSON object", code="invalid_body")
        return APIError(400, f"parameter '{param}' is required", param=param, code="missing_required_parameter")
    msg = first.get("msg", "invalid request")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


async def serve(args: EngineArgs, config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT (then drain) or until the engine cannot start. Returns the exit code."""
    name = config.served_model_name or args.model
    metrics = PrometheusMetrics(name)
    engine = AsyncLLM(args, max_queued_requests=config.max_queued_requests,
                      max_queued_tokens=config.max_queued_tokens, request_timeout=config.request_timeout,
                      stats_sink=metrics)
    state = ServerState(config, engine, metrics, name)
    app = build_app(state)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                        timeout_graceful_shutdown=5, lifespan="off")
    server = DrainingServer(uv, state)
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
