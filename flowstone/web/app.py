"""The web view's ASGI application (Starlette): read-only pages and their JSON twins.

``create_app(store, pipeline, tenant=None, token=None, runtime=None)``. Every request
runs in the server's one tenant. With ``token``, a request must carry it: an
``Authorization: Bearer`` header, or the ``flowstone_token`` cookie that a first visit
with ``?token=...`` sets (a browser cannot add headers to a link or an event stream).
Backfill progress streams as server-sent events: from ``runtime``'s events when the
backfill runs there (``flowstone dev``), else from the store, read twice a second.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..definitions import FieldError
from ..errors import BackfillNotFound, DefinitionError, FlowstoneError, NotFound
from ..pipeline import Pipeline
from ..tenancy import tenant_scope
from . import data, html

__all__ = ["create_app"]

POLL_SECONDS = 0.5
"""How often a progress stream reads a backfill that runs in another process."""
COOKIE = "flowstone_token"


def create_app(
    store: Any, pipeline: Pipeline, *, tenant: str | None = None, token: str | None = None, runtime: Any = None,
    stopping: anyio.Event | None = None,
) -> ASGIApp:
    """The application; ``stopping`` (set when the server shuts down) ends open streams."""
    stopping = stopping or anyio.Event()
    healths = data.HealthCache()

    View = Callable[[Request], Awaitable[dict[str, Any]]]
    Endpoint = Callable[[Request], Awaitable[Response]]

    def page(view: View, render: Callable[..., str]) -> tuple[Endpoint, Endpoint]:
        """The view as an HTML page and as its JSON twin (each runs what the view left
        for after the answer, such as a refresh of a health bar)."""
        async def as_html(request: Request) -> Response:
            return HTMLResponse(render(await view(request), tenant=tenant), background=_after(request))

        async def as_json(request: Request) -> Response:
            return JSONResponse(await view(request), background=_after(request))

        return as_html, as_json

    async def graph(request: Request) -> dict[str, Any]:
        return data.graph_data(pipeline)

    async def asset(request: Request) -> dict[str, Any]:
        name = request.path_params["name"]
        if name not in pipeline:
            raise NotFound(f"no asset {name!r}")
        request.state.later = []
        return await data.asset_data(store, pipeline, name, before=request.query_params.get("before"), cache=healths,
                                     later=request.state.later)

    async def record(request: Request) -> dict[str, Any]:
        return await data.record_data(store, pipeline, request.path_params["id"])

    async def backfills(request: Request) -> dict[str, Any]:
        given = request.query_params.get("offset", "0")
        if not given.isdigit():
            raise DefinitionError([FieldError("offset", f"must be a number of backfills, got {given!r}")])
        return await data.backfills_data(store, offset=int(given))

    async def status_of(id: str) -> Any:
        """A backfill's status: the runtime's when it runs there, else the store's."""
        return await (runtime.backfill_status(id) if runtime is not None else _backfill_status(store, id))

    async def backfill(request: Request) -> dict[str, Any]:
        return data.backfill_json(await status_of(request.path_params["id"]))

    async def daemon(request: Request) -> dict[str, Any]:
        return await data.daemon_data(store, pipeline)

    async def events(request: Request) -> Response:
        first = await status_of(request.path_params["id"])
        return StreamingResponse(_progress(store, runtime, first, stopping), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    routes = []
    for path, view, render in (
        ("/", graph, html.graph_page), ("/assets/{name}", asset, html.asset_page),
        ("/records/{id}", record, html.record_page), ("/backfills", backfills, html.backfills_page),
        ("/backfills/{id}", backfill, html.backfill_page), ("/daemon", daemon, html.daemon_page),
    ):
        as_html, as_json = page(view, render)
        routes.append(Route(path, as_html))
        routes.append(Route("/api" + ("/graph" if path == "/" else path), as_json))
    routes.append(Route("/api/backfills/{id}/events", events))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for asset in pipeline.assets:  # the partition keys as text, made once before the first look
            healths.keys(asset)
        yield

    app = Starlette(routes=routes, exception_handlers={FlowstoneError: _error}, lifespan=lifespan)
    return _Guarded(app, tenant, token)


def _after(request: Request) -> BackgroundTasks | None:
    later = getattr(request.state, "later", None)
    if not later:
        return None
    tasks = BackgroundTasks()
    for task in later:
        tasks.add_task(task)
    return tasks


async def _backfill_status(store: Any, id: str | uuid.UUID) -> Any:
    """The backfill's status as the store saved it; ``BackfillNotFound`` when there is none."""
    from ..store.records import parse_id

    backfill = parse_id(id, "backfill")
    status = await store.load_backfill_status(backfill)  # the spec unread: this is polled twice a second
    if status is None:
        raise BackfillNotFound(backfill)
    return status


async def _progress(store: Any, runtime: Any, first: Any, stopping: anyio.Event) -> AsyncIterator[str]:
    """``data: {backfill}`` at once and at each change, until it has ended (or the server
    stops): from the runtime's events when it runs the backfill, at most ten a second,
    else from the store, read every ``POLL_SECONDS``."""
    yield _event(first)
    if first.state != "running":
        return
    if runtime is not None:
        async for status in _from_events(runtime, first, stopping):
            yield _event(status)
        return
    last = status = first
    while status.state == "running" and not stopping.is_set():
        with anyio.move_on_after(POLL_SECONDS):
            await stopping.wait()
        status = await _backfill_status(store, first.id)
        if status != last:
            yield _event(status)
            last = status


def _event(status: Any) -> str:
    return f"data: {json.dumps(data.backfill_json(status))}\n\n"


EVENT_SECONDS = 0.1
"""Least time between two progress messages of one stream (a backfill may finish
thousands of partitions a second; a browser needs a few updates a second)."""


async def _from_events(runtime: Any, first: Any, stopping: anyio.Event) -> AsyncIterator[Any]:
    """The backfill's status after each of its events, coalesced to one per
    ``EVENT_SECONDS``, until it has finished or the server stops (looked at every
    ``POLL_SECONDS`` while no event comes)."""
    from ..events import BackfillFinished

    async with runtime.events(kinds=["BackfillProgress", "BackfillFinished"]) as events:
        status = await runtime.backfill_status(first.id)  # what happened before the subscription
        if status.state != "running":
            yield status
            return
        sent, upcoming, behind = anyio.current_time() - EVENT_SECONDS, events.__aiter__(), False
        while not stopping.is_set():
            event = None
            with anyio.move_on_after(EVENT_SECONDS if behind else POLL_SECONDS):
                try:
                    event = await upcoming.__anext__()
                except StopAsyncIteration:  # the runtime closed
                    return
            if event is not None and getattr(event, "backfill_id", first.id) != first.id:
                continue  # another backfill's (dropped events name none: they count)
            finished = isinstance(event, BackfillFinished)
            if event is None and not behind:
                continue  # quiet, and nothing held back
            if finished or anyio.current_time() - sent >= EVENT_SECONDS:
                sent, behind = anyio.current_time(), False
                status = await runtime.backfill_status(first.id)
                yield status
                if finished or status.state != "running":
                    return
            else:
                behind = True  # sent once the pause is over, even if no event follows


async def _error(request: Request, error: Exception) -> Response:
    status = 404 if isinstance(error, (NotFound, BackfillNotFound)) else 400
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": str(error), "type": type(error).__name__}, status_code=status)
    body = f"<h1>{'Not found' if status == 404 else 'Bad request'}</h1><p>{html.escape(str(error))}</p>"
    return HTMLResponse(html._page("Error", body, tenant=None), status_code=status)


class _Guarded:
    """Every request in the server's tenant; with a token, only those carrying it."""

    def __init__(self, app: ASGIApp, tenant: str | None, token: str | None) -> None:
        self.app, self.tenant, self.token = app, tenant, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.token is not None:
            request = Request(scope)
            given = request.query_params.get("token")
            if given is not None and hmac.compare_digest(given, self.token):
                answer = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
                answer.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
                await answer(scope, receive, send)
                return
            header = request.headers.get("authorization", "")
            offered = header.removeprefix("Bearer ") if header.startswith("Bearer ") else request.cookies.get(COOKIE)
            if offered is None or not hmac.compare_digest(offered, self.token):
                await JSONResponse({"error": "a token is needed: Authorization: Bearer <token>, or open "
                                    "/?token=<token> once in a browser"}, status_code=401)(scope, receive, send)
                return
        with tenant_scope(self.tenant) if self.tenant else contextlib.nullcontext():
            await self.app(scope, receive, send)

