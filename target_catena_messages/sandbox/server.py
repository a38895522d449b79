"""``Sandbox``: the aiohttp server on its own thread, its listener, and the introspection API.

The server runs on a private event loop in a daemon thread so a test (or the CLI) can drive it
synchronously. The listening socket is managed here rather than by an aiohttp site, because the
``refuse`` fault must close it and bind the same port again later. Introspection goes through the
thread-safe ``Store``, both as Python methods and as JSON under ``/_sandbox/``.

The loop is uvloop's when it is installed (the ``sandbox`` extra): a leaner loop for the benchmarks,
which need the sandbox far from being their bottleneck (its gain was within the noise of the
loaded machine it was measured on; docs/sandbox.md, "Performance").
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

try:
    import uvloop
except ImportError:  # optional: the stdlib loop behaves the same, only slower
    uvloop = None  # type: ignore[assignment]
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from target_catena_messages.sandbox import responses as r
from target_catena_messages.sandbox.api import CatenaApi
from target_catena_messages.sandbox.config import SandboxConfig, SandboxConfigError, load_config
from target_catena_messages.sandbox.store import Store

log = logging.getLogger(__name__)

ConfigSource = SandboxConfig | Mapping[str, Any] | str | Path | None
_SHUTDOWN_TIMEOUT = 0.5


class Sandbox:
    """A local Catena API with a fault plan; see docs/sandbox.md.

    Example:
        >>> with Sandbox({"message_schema": "catena_ids"}) as sandbox:
        ...     requests.post(sandbox.url + "/v2/telematics/messages", ...)
        ...     sandbox.received()
    """

    def __init__(self, config: ConfigSource = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self.store = Store()
        self.api = CatenaApi(load_config(config), self.store, self._refuse)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._refuse_until = 0.0
        self._reopen_task: asyncio.Task[None] | None = None
        self._busy: set[RequestHandler] = set()
        self._startup_error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (only once started)."""
        if self._thread is None:
            raise RuntimeError("the sandbox is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    @property
    def port(self) -> int:
        """The bound port (0 before the first start when a free port was asked for)."""
        return self._port

    @property
    def config(self) -> SandboxConfig:
        """The config in force."""
        return self.api.runtime.config

    def start(self) -> str:
        """Bind, serve on a daemon thread and return the base URL.

        Raises:
            OSError: when the address cannot be bound.
        """
        if self._thread is not None:
            return self.url
        ready = threading.Event()
        self._startup_error = None
        self._busy.clear()
        self._loop = asyncio.new_event_loop() if uvloop is None else uvloop.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="catena-sandbox", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        log.info("catena sandbox listening on %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving (in-flight requests get up to half a second) and join the thread."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        loop.call_soon_threadsafe(stopping.set)
        thread.join()
        self._thread = None

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(ready))
        except Exception as exc:
            if ready.is_set():
                log.exception("the sandbox server failed")
            else:
                self._startup_error = exc
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(
            self._app(), access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT
        )
        await self._runner.setup()
        try:
            await self._listen()
        except OSError as exc:
            self._startup_error = exc
            await self._runner.cleanup()
            return
        ready.set()
        await self._stopping.wait()
        if self._reopen_task is not None:
            self._reopen_task.cancel()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await self._runner.cleanup()

    async def _listen(self) -> None:
        assert self._runner is not None
        assert self._runner.server is not None
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._runner.server, self.host, self._port, reuse_address=True, backlog=512
        )
        if self._port == 0:
            self._port = int(self._listener.sockets[0].getsockname()[1])

    def _refuse(self, seconds: float) -> None:
        """Close the listener for ``seconds`` and every connection once it is idle."""
        loop = asyncio.get_running_loop()
        self._refuse_until = max(self._refuse_until, loop.time() + seconds)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        assert self._runner is not None
        assert self._runner.server is not None
        for connection in self._runner.server.connections:
            if connection in self._busy:
                connection.close()  # after its answer
            else:
                connection.force_close()
        if self._reopen_task is None or self._reopen_task.done():
            self._reopen_task = loop.create_task(self._reopen())
        log.info("refusing connections for %.3gs", seconds)

    async def _reopen(self) -> None:
        loop = asyncio.get_running_loop()
        while (delay := self._refuse_until - loop.time()) > 0:
            await asyncio.sleep(delay)
        try:
            await self._listen()
        except OSError:
            log.exception("could not listen again on port %d after a refuse fault", self._port)
            return
        log.info("accepting connections again")

    # -- the app ------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(self.api.routes())
        app.add_routes(
            [
                web.get("/_sandbox/received", self._http_received),
                web.get("/_sandbox/stats", self._http_stats),
                web.get("/_sandbox/operations", self._http_operations),
                web.get("/_sandbox/accepted_bodies", self._http_accepted_bodies),
                web.post("/_sandbox/reset", self._http_reset),
                web.post("/_sandbox/config", self._http_config),
                web.post("/_sandbox/operations/complete", self._http_complete),
            ]
        )
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Track busy connections; turn aiohttp's text errors into Catena's JSON envelopes."""
        protocol = request.protocol
        self._busy.add(protocol)
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = r.api_error(exc.status)
            if exc.status == 405 and "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
        except Exception:
            log.exception("unexpected error handling %s %s", request.method, request.path)
            response = r.api_error(500)
        finally:
            self._busy.discard(protocol)
        return response

    async def _http_received(self, request: web.Request) -> web.Response:
        return r.json_response(200, self.received())

    async def _http_stats(self, request: web.Request) -> web.Response:
        return r.json_response(200, self.stats())

    async def _http_operations(self, request: web.Request) -> web.Response:
        return r.json_response(200, self.operations())

    async def _http_accepted_bodies(self, request: web.Request) -> web.Response:
        return r.json_response(200, self.accepted_bodies())

    async def _http_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return r.json_response(200, {"ok": True})

    async def _http_config(self, request: web.Request) -> web.Response:
        try:
            self.configure(SandboxConfig.from_dict(await request.json()))
        except (ValueError, SandboxConfigError) as exc:
            return r.api_error(400, str(exc))
        return r.json_response(200, {"ok": True})

    async def _http_complete(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            count = self.complete_operations(
                status=data.get("status", "success"),
                ids=data.get("ids"),
                error_type=data.get("error_type", "tsp"),
                error_details=data.get("error_details", "Completed as failed by the test"),
            )
        except (ValueError, AttributeError, TypeError) as exc:
            return r.api_error(400, str(exc))
        return r.json_response(200, {"completed": count})

    # -- introspection and control -----------------------------------------------------------

    def configure(self, config: ConfigSource) -> None:
        """Replace the config and fault plan at runtime; request numbers restart at 1.

        Operations, received requests and issued tokens are kept (``reset`` forgets them).
        """
        self.api.configure(load_config(config))

    def reset(self) -> None:
        """Forget requests received, counters and operations; tokens issued stay valid."""
        self.store.reset()
        self.api.configure(self.api.runtime.config)

    def received(self) -> list[dict[str, Any]]:
        """One entry per POST /messages, in arrival order (see docs/sandbox.md for the keys)."""
        return self.store.received()

    def accepted_bodies(self) -> list[Any]:
        """Bodies that created an operation, in order, including those whose answer was dropped."""
        return self.store.accepted_bodies()

    def stats(self) -> dict[str, Any]:
        """Counters: ``requests`` and ``status_counts`` per endpoint, ``peak_in_flight``,
        ``in_flight``, ``token_requests``, ``tokens_issued``, ``operations``, ``accepted`` (POSTs
        answered 200/202) and ``faults_fired`` (per rule, in rule order).
        """  # noqa: D205
        stats = self.store.stats()
        stats["faults_fired"] = self.api.runtime.plan.fired()
        return stats

    def operations(self) -> list[dict[str, Any]]:
        """Every operation as ResourceOperationRead, oldest first (due completions applied)."""
        ops = self.api.runtime.config.operations
        self.store.settle(ops.complete_after_seconds, ops.error_type, ops.error_details)
        return self.store.operations()

    def complete_operations(
        self,
        status: str = "success",
        ids: list[str] | None = None,
        error_type: str = "tsp",
        error_details: str = "Completed as failed by the test",
    ) -> int:
        """Complete pending operations now (all, or those in ``ids``); returns how many changed.

        Raises:
            ValueError: for a status other than ``success`` or ``failed``.
        """
        if status not in ("success", "failed"):
            raise ValueError("status must be success or failed")
        return self.store.complete(status, ids, error_type, error_details)
