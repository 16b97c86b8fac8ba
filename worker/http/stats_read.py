"""``GET /v1/feedback/{insight_id}/stats``: the hottest read, served at the ASGI level.

A dashboard asks for an insight's stats more than for anything else, and on a cache
hit the read is one Redis GET: Starlette's middleware layers, routing and request
objects, and FastAPI's parameter solving, cost more than the read itself. So, like
push (``worker.http.push_endpoint``), the app (``worker.http.app.WorkerApp``) hands a
stats request straight from the ASGI scope to ``StatsRead``, when it is one the
route would answer: a GET whose id the route takes (1 to 100 characters, no NUL, no
slash). Every other request goes on to FastAPI, whose route of the same path stays:
it documents the read in OpenAPI, and answers what this defers (its 422s, HEAD, a
trailing slash, an app under a root path). Errors are the API's own
(``worker.http.errors.respond``), the same bodies the route would give.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from worker.exceptions import WorkerError
from worker.http import errors
from worker.read.cached import CacheService

ROUTE = "/v1/feedback/{insight_id}/stats"
"""The path, as ``worker.http.read_routes`` declares it too."""
_PREFIX, _SUFFIX = ROUTE.split("{insight_id}")
MAX_INSIGHT_ID_CHARS = 100
"""The id's length limit, which the route's parameter declares too (CONTRACT.md's
identifier)."""


def stats_insight_id(scope: Scope) -> str | None:
    """The insight id of a stats request ``StatsRead`` answers, or None (FastAPI's)."""
    if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    insight_id = path[len(_PREFIX) : -len(_SUFFIX)]
    if not 0 < len(insight_id) <= MAX_INSIGHT_ID_CHARS or "/" in insight_id:
        return None
    if "\x00" in insight_id:
        return None  # the route's 422
    return insight_id


class StatsRead:
    """The ASGI app of a stats request: the cached JSON text as is, through the
    cache-aside path of ``reads``. ``route`` is the FastAPI route it answers for.

    The caller matched the request (``stats_insight_id``) and put the id in
    ``scope["path_params"]``, as Starlette's router does on a match."""

    def __init__(self, reads: Callable[[], CacheService], route: BaseRoute) -> None:
        self.reads = reads
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        insight_id: str = scope["path_params"]["insight_id"]
        # Also recorded by Starlette's router on a match: telemetry names the request by it.
        scope["route"] = self.route
        try:
            text = await self.reads().feedback_stats_json(insight_id)
        except WorkerError as error:
            response = await errors.respond(Request(scope), error)
            await response(scope, receive, send)
            return
        body = text.encode()
        # The headers starlette's Response gives the route's answer, in its order.
        headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
