"""Domain exceptions and request-validation failures -> the contract's error body and status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import errors as E
from .disconnect import ClientDisconnected

log = logging.getLogger(__name__)

STATUS: list[tuple[type[E.AdapterServerError], int]] = [
    (E.AdapterNotFoundError, 404),
    (E.NotEnabledError, 404),
    (E.ForbiddenError, 403),
    (E.AdapterExistsError, 409),
    (E.ConflictError, 409),
    (E.InvalidAdapterIdError, 400),
    (E.InvalidAdapterError, 400),  # includes UnsupportedAdapterError
    (E.NotMergeableError, 400),
    (E.InvalidRequestError, 400),
    (E.OverloadedError, 429),
    (E.PayloadTooLargeError, 413),
    (E.GenerationFailedError, 422),
    (E.RequestTimeoutError, 504),
    (E.NotReadyError, 503),
]
# pydantic error types that mean "the body is malformed" (422); any other is a bad value (400)
MALFORMED = ("json_invalid", "missing", "extra_forbidden", "model_type", "model_attributes_type", "dict_type",
             "list_type", "string_type", "int_type", "float_type", "bool_type", "int_parsing", "float_parsing",
             "bool_parsing", "literal_error", "union_tag_invalid", "value_error.missing")


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def status_of(exc: E.AdapterServerError) -> int:
    if isinstance(exc, E.AuthError):
        return exc.status
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def inband_error(exc: Exception) -> dict[str, dict[str, object]]:
    """The error body for a stream whose headers are already sent: same shape, with the status inside."""
    if isinstance(exc, E.AdapterServerError):
        return {"error": {"type": exc.kind, "message": str(exc), "status": status_of(exc)}}
    return {"error": {"type": "internal_error", "message": str(exc), "status": 500}}


def install(app: FastAPI) -> None:
    @app.exception_handler(E.AdapterServerError)
    async def _domain(request: Request, exc: E.AdapterServerError) -> JSONResponse:
        status = status_of(exc)
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))} if isinstance(exc, E.OverloadedError) else None
        if isinstance(exc, E.AuthError):
            headers = {"WWW-Authenticate": "Bearer"}
        if status >= 500 and status != 503 and status != 504:
            log.error("request failed: %s", exc)
        return error_response(status, exc.kind, str(exc), headers)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it: the disconnect was logged once, as info

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        parts = []
        for e in errs[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
        malformed = any(e.get("type") in MALFORMED for e in errs)
        status, kind = (422, "malformed_request") if malformed else (400, "invalid_parameter")
        return error_response(status, kind, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "bad_request"}
        return error_response(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "internal_error", "internal error; the server logged the details")
