"""Every error of the app as an OpenAI-style body ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetlm.entrypoints.openai.middleware import BodyTooLarge
from fleetlm.entrypoints.openai.protocol import UNSUPPORTED, APIError


def error_response(e: APIError) -> Response:
    # ensure_ascii: a message may quote input holding lone surrogates
    return Response(json.dumps(e.body()), status_code=e.status, headers=e.headers, media_type="application/json")


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        return error_response(validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        if isinstance(e, BodyTooLarge):
            return error_response(APIError(413, f"request body exceeds {max_body_bytes} bytes", code="body_too_large"))
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return error_response(APIError(e.status_code, str(e.detail), type=kind, headers=dict(e.headers or {})))


def validation_error(e: RequestValidationError) -> APIError:
    """Pydantic's (or the JSON decoder's) complaint as one 400 naming the parameter."""
    errs = e.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
        return json_error(first)
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        why = "is not supported by this server" if loc and loc[-1] in UNSUPPORTED else "is not a known parameter"
        return APIError(400, f"parameter '{param}' {why}", param=param, code="unsupported_parameter")
    if first.get("type") == "missing":
        if param is None:
            return APIError(400, "the request body must be a JSON object", code="invalid_body")
        return APIError(400, f"parameter '{param}' is required", param=param, code="missing_required_parameter")
    msg = first.get("msg", "invalid request")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def json_error(err: dict) -> APIError:
    """A body that is not JSON: what is wrong and where, with no parameter (the location FastAPI
    gives is a character offset, not a field)."""
    loc = [x for x in err.get("loc", ()) if x != "body"]
    where = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
    why = (err.get("ctx") or {}).get("error") or "malformed JSON"
    return APIError(400, f"the request body is not valid JSON: {why}{where}", param=None, code="invalid_json")
