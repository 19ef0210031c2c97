"""Serving the web view with Hypercorn, on whichever backend runs (asyncio or trio)."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from anyio.abc import TaskStatus

__all__ = ["serve"]

log = logging.getLogger("flowstone.web")


async def serve(
    app: Any, *, host: str = "127.0.0.1", port: int = 3000, stopping: anyio.Event,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until ``stopping`` is set, then finish the
    requests in flight. ``task_status`` gets the URL (the port the system gave, for 0)."""
    import sniffio
    from hypercorn.config import Config
    from hypercorn.utils import wrap_app

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("flowstone.web.server")
    config.graceful_timeout = 5.0
    sockets = config.create_sockets()  # bound here, so the port is known before serving
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
    bound = sockets.insecure_sockets[0].getsockname()
    url = f"http://{bound[0]}:{bound[1]}"
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)
    log.info("web view on %s", url)
    task_status.started(url)
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio.run import worker_serve as trio_serve

        await trio_serve(wrapped, config, sockets=sockets, shutdown_trigger=stopping.wait)
    else:
        import asyncio

        from hypercorn.asyncio.run import worker_serve as asyncio_serve

        # In a task of its own: Hypercorn's asyncio.TaskGroup cancels (then uncancels) the
        # task it runs in to shut down, which must not be a task under anyio's cancel scopes.
        # Cancelled, it is asked to stop rather than cut (its shutdown expects no cancel).
        server = asyncio.get_running_loop().create_task(
            asyncio_serve(wrapped, config, sockets=sockets, shutdown_trigger=stopping.wait))
        try:
            await asyncio.shield(server)
        except BaseException:
            stopping.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(config.graceful_timeout + 1):
                await asyncio.wait([server])
            raise
