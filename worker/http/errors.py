"""The read API's errors, in its own words: details go to the log, never to the client.

404 ``{"error": "not_found", ...}``; 422 ``{"error": "invalid", "detail": [{"loc":
..., "msg": ...}]}`` naming the field but never echoing its value; 503 ``{"error":
"unavailable", ...}`` without the error's text.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from worker.exceptions import NotFoundError, ValidationError, WorkerError

log = logging.getLogger(__name__)

LOGGED_CHARS = 500


async def not_found(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"error": "not_found", "detail": str(error)}, status_code=404)


async def unprocessable(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    # FastAPI's format without "input" and "ctx": an error never echoes the request.
    detail = [
        {"type": e.get("type"), "loc": e.get("loc"), "msg": e.get("msg")} for e in error.errors()
    ]
    return JSONResponse({"error": "invalid", "detail": detail}, status_code=422)


async def invalid(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ValidationError)
    field, _, message = error.detail.partition(": ")
    # The routes' own checks read "field: message"; one translated from a driver
    # error (it has a cause) carries the database's text, which stays in the log.
    if error.__cause__ is not None or not field.isidentifier():
        log.warning(
            "value refused by the database",
            extra={"path": request.url.path, "error": error.detail[:LOGGED_CHARS]},
        )
        refused = {"loc": ["request"], "msg": "a parameter holds a value that cannot be stored"}
        return JSONResponse({"error": "invalid", "detail": [refused]}, status_code=422)
    return JSONResponse(
        {"error": "invalid", "detail": [{"loc": ["query", field], "msg": message}]},
        status_code=422,
    )


async def unavailable(request: Request, error: Exception) -> JSONResponse:
    log.warning(
        "request failed",
        extra={
            "path": request.url.path,
            "error_type": type(error).__name__,
            "error": str(error)[:LOGGED_CHARS],
        },
    )
    return JSONResponse(
        {"error": "unavailable", "detail": "a dependency is unavailable; retry"},
        status_code=503,
    )


ErrorHandler = Callable[[Request, Exception], Awaitable[JSONResponse]]

HANDLERS: tuple[tuple[type[Exception], ErrorHandler], ...] = (
    (NotFoundError, not_found),
    (RequestValidationError, unprocessable),
    (ValidationError, invalid),
    (WorkerError, unavailable),
)
"""Each error's answer; a subclass before its base, so that the first match is the
one Starlette's lookup (the most specific class) picks."""


def install(app: FastAPI) -> None:
    """Register the handlers with the app."""
    for kind, handler in HANDLERS:
        app.add_exception_handler(kind, handler)


async def respond(request: Request, error: WorkerError) -> JSONResponse:
    """The answer the app gives ``error`` (for a route served outside the app's stack:
    ``worker.http.stats_read``)."""
    for kind, handler in HANDLERS:
        if isinstance(error, kind):
            return await handler(request, error)
    raise AssertionError("WorkerError has a handler")
