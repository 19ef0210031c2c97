"""The one place FlowStone crosses from the caller's event loop to asyncio.

asyncpg runs on asyncio only. On asyncio, ``Bridge.run(fn, *args)`` simply
awaits ``fn(*args)``. On trio, it runs ``fn`` on an asyncio loop hosted by
trio-asyncio: one loop per ``trio.run``, held open by a trio *system task* so
that a store can connect lazily from any task and outlive the task that first
used it. The loop closes when ``close()`` is called or when ``trio.run`` ends;
either way the ``on_close`` hook (closing the connection pool) runs on it first.

``fn`` is always an asyncio coroutine function that does a whole unit of work
(acquire a connection, run a transaction, release): nothing asyncio-bound ever
leaks to the caller's side.

``LoopBound`` holds what such work needs across calls (a connection pool, an S3
client): opened lazily on the running asyncio loop, opened again on a new loop,
and closed when its loop shuts down if nobody closed it before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import sniffio

__all__ = ["Bridge", "LoopBound"]

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("flowstone.postgres")

CLOSE_SECONDS = 5.0


class Bridge:
    """Runs asyncio coroutine functions from asyncio or trio callers."""

    def __init__(self, on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self._on_close = on_close
        self._trio: _TrioLoop | None = None

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if sniffio.current_async_library() == "asyncio":
            return await fn(*args)
        return await self._run_on_trio(fn, args)

    async def _run_on_trio(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
        import trio
        import trio_asyncio

        host = self._trio
        if host is None or host.token is not trio.lowlevel.current_trio_token() or host.finished.is_set():
            host = self._trio = _TrioLoop(self._on_close)
            trio.lowlevel.spawn_system_task(host.hold, name="flowstone.postgres.asyncio-loop")
        await host.ready.wait()
        if host.loop is None:
            raise RuntimeError("the asyncio loop for asyncpg did not start") from host.error
        return await trio_asyncio.aio_as_trio(fn, loop=host.loop)(*args)

    async def close(self) -> None:
        """Run ``on_close`` and, on trio, end the hosted asyncio loop."""
        host, self._trio = self._trio, None
        if sniffio.current_async_library() == "asyncio":
            if self._on_close is not None:
                await self._on_close()
            return
        if host is not None:
            host.stop.set()
            await host.finished.wait()


class _TrioLoop:
    """One trio-asyncio loop held open by a system task until ``stop`` is set or
    the trio run ends."""

    def __init__(self, on_close: Callable[[], Awaitable[None]] | None) -> None:
        import trio

        self.token = trio.lowlevel.current_trio_token()
        self.ready = trio.Event()
        self.stop = trio.Event()
        self.finished = trio.Event()
        self.loop: Any = None
        self.error: BaseException | None = None
        self._on_close = on_close

    async def hold(self) -> None:
        import trio
        import trio_asyncio

        try:
            async with trio_asyncio.open_loop() as loop:
                # trio-asyncio's default handler raises what asyncio only logs (a
                # future of asyncpg's whose error nobody retrieved after a cancelled
                # query), and that would end this loop and every store on it.
                loop.set_exception_handler(_log_loop_error)
                self.loop = loop
                self.ready.set()
                try:
                    await self.stop.wait()
                finally:
                    # Cancelled when trio.run ends: close the pool on this loop first.
                    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS):
                        if self._on_close is not None:
                            try:
                                await trio_asyncio.aio_as_trio(self._on_close, loop=loop)()
                            except Exception:  # a system task must not raise
                                log.exception("closing the PostgreSQL pool failed")
        except Exception as error:  # a system task must not raise: report and end
            self.error = error
            log.exception("the asyncio loop for asyncpg failed")
        finally:
            self.loop = None
            self.ready.set()
            self.finished.set()


def _log_loop_error(loop: Any, context: dict[str, Any]) -> None:
    """What plain asyncio does with an error no task will see: log it."""
    log.debug("asyncio (under trio): %s", context.get("message"), exc_info=context.get("exception"))


class LoopBound(Generic[R]):
    """One resource per asyncio event loop, opened on first use.

    ``open()`` makes it (callers arriving meanwhile share that one opening);
    ``close(resource)`` releases it gracefully, on its loop; ``abort(resource)``
    drops it synchronously (for a loop that is ending or gone). Used from a new
    loop (a second ``asyncio.run``), the old resource is aborted and a new one
    opened. A keeper task closes the resource when its loop shuts down without
    ``close()``: ``asyncio.run`` cancels leftover tasks and runs them to their
    end while the loop can still close sockets, so an ended loop's connections
    are not leaked.
    """

    def __init__(
        self,
        open: Callable[[], Awaitable[R]],
        close: Callable[[R], Awaitable[None]],
        abort: Callable[[R], None],
    ) -> None:
        self._open, self._close, self._abort = open, close, abort
        self._value: R | None = None
        self._loop: Any = None
        self._keeper: asyncio.Task[None] | None = None
        self._opening: asyncio.Future[R] | None = None

    async def get(self) -> R:
        loop = asyncio.get_running_loop()
        if self._value is not None and self._loop is loop:
            return self._value
        if self._opening is not None and self._loop is loop:
            return await asyncio.shield(self._opening)
        if self._value is not None:  # made on a loop that has ended
            self._drop()
        self._loop = opening_loop = loop
        opening = self._opening = loop.create_future()
        try:
            value = await self._open()
        except BaseException as error:
            if self._opening is opening:
                self._opening = None
                self._loop = None
            opening.set_exception(error if isinstance(error, Exception) else RuntimeError("opening was cancelled"))
            opening.exception()  # retrieved: the callers sharing it get it from there
            raise
        self._opening = None
        self._value = value
        opening.set_result(value)
        self._keeper = opening_loop.create_task(self._keep(value), name="flowstone.loop-bound-keeper")
        return value

    async def _keep(self, value: R) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            # Cancelled once, by the loop's shutdown (or by close(), which cleared
            # the value first): the loop still runs this to the end.
            if self._value is value:
                self._value, self._loop = None, None
                try:
                    await asyncio.wait_for(self._close(value), CLOSE_SECONDS)
                except BaseException:
                    self._abort(value)

    def _drop(self) -> None:
        value, self._value, self._loop = self._value, None, None
        try:
            self._abort(value)  # type: ignore[arg-type]
        except Exception:  # its loop is closed; the sockets went with it
            pass

    async def close(self) -> None:
        """Release the resource if it belongs to the running loop (else nothing to do here)."""
        value = self._value
        if value is None or self._loop is not asyncio.get_running_loop():
            return
        self._value, self._loop = None, None
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.wait([keeper])
        await self._close(value)
