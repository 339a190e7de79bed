"""A worker's own view of its liveness: model calls that never return, and what waits on them.

A model call cannot be interrupted (it runs on the predict thread, maybe in native code), so a
``predict`` that hangs takes its worker with it. What we can do is say so quickly and cleanly:

- :class:`PredictWatch` wraps each model call and records it in the worker's liveness file
  (``engines/local/liveness.py``), which the supervisor reads;
- :class:`HungGuard` (outermost ASGI middleware) keeps the ``/invocations`` requests in flight; once
  the watch declares the worker hung it answers every one of them, and every new one, with ``503``
  and ``Retry-After`` at once (instead of each waiting for its own 504), with ``Connection: close``
  so clients reconnect to a healthy worker.

The worker then stops accepting and exits; the supervisor has already started its replacement.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlflow_deploy_plugin.engines.local.liveness import LivenessWriter


def _rows(data: Any) -> int:
    try:
        return len(data)
    except TypeError:
        return 1


class PredictWatch:
    """Times every model call of this worker (one predict thread, so one call at a time)."""

    def __init__(self, liveness: LivenessWriter, limit_s: float) -> None:
        self.liveness = liveness
        self.limit_s = limit_s

    def wrap(self, predict: Callable[..., Any]) -> Callable[..., Any]:
        def watched(data: Any, params: dict[str, Any] | None = None) -> Any:
            self.liveness.predict_started(_rows(data))
            try:
                return predict(data, params)
            finally:
                self.liveness.predict_ended()

        return watched

    @property
    def hung(self) -> bool:
        return self.liveness.busy_for() > self.limit_s


_HUNG_BODY = json.dumps({
    "error_code": "TEMPORARILY_UNAVAILABLE",
    "message": "This worker's model call has not returned in time; it is being replaced. Retry shortly.",
}).encode()


class HungGuard:
    """Answers 503 to the ``/invocations`` requests of a hung worker, queued ones included."""

    def __init__(self, app: ASGIApp, retry_after_s: int = 1) -> None:
        self.app = app
        self.hung = False
        self.retry_after = str(retry_after_s).encode()
        self._waiting: set[asyncio.Task[None]] = set()

    def declare_hung(self) -> None:
        """Fail everything waiting on the model now; refuse what comes next."""
        self.hung = True
        for task in list(self._waiting):
            task.cancel()

    async def _refuse(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"retry-after", self.retry_after),
            (b"connection", b"close"), (b"content-length", str(len(_HUNG_BODY)).encode())]})
        await send({"type": "http.response.body", "body": _HUNG_BODY})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        if self.hung:
            await self._refuse(send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracked))
        self._waiting.add(task)
        try:
            await asyncio.shield(task)  # our own cancellation (client gone, shutdown) reaches the task below
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                task.cancel()
                raise
            if not (self.hung and task.cancelled()):
                raise
            if not started:
                await self._refuse(send)
        finally:
            self._waiting.discard(task)
