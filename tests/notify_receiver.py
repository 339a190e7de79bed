"""A real HTTP receiver of `-C notify` deliveries for tests: 127.0.0.1, a chosen port, stdlib server.

It verifies every delivery with the project's own verifier (``lifecycle/webhooks/verify.py``, the
same one the incoming-webhook receiver uses), can answer 503 (or 429, with Retry-After) for its first
N deliveries (a receiver in trouble), and can be stopped and started again on the same port (a
receiver that is down).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mlflow_deploy_plugin.lifecycle.webhooks.verify import (
    DELIVERY_ID_HEADER,
    WebhookRejected,
    verify_delivery,
)


@dataclass
class Received:
    path: str
    delivery_id: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class Receiver:
    """Collects verified deliveries; ``fail_first`` answers ``fail_status`` (503; with a ``Retry-After``
    header when ``retry_after`` is set) to that many deliveries first."""

    port: int
    secret: str
    fail_first: int = 0
    fail_status: int = 503
    retry_after: str | None = None
    received: list[Received] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    answered_503: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {key: value for key, value in self.headers.items()}
                try:
                    verify_delivery(receiver.secret, headers, body)
                except WebhookRejected as exc:
                    with receiver._lock:
                        receiver.rejected.append(exc.reason)
                    self._answer(401)
                    return
                with receiver._lock:
                    if receiver.answered_503 < receiver.fail_first:
                        receiver.answered_503 += 1
                        self._answer(receiver.fail_status, receiver.retry_after)
                        return
                    receiver.received.append(Received(self.path, str(self.headers.get(DELIVERY_ID_HEADER)), json.loads(body),
                                                      headers))
                self._answer(200)

            def _answer(self, status: int, retry_after: str | None = None) -> None:
                self.send_response(status)
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._server = None

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r.body for r in self.received if path is None or r.path == path]

    def events(self, path: str | None = None) -> list[str]:
        return [str(body.get("event")) for body in self.bodies(path)]
