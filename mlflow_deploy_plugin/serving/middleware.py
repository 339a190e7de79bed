"""Plain ASGI middlewares of the serving app, one idea each, so they cost microseconds per request."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Protocol

from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlflow_deploy_plugin.serving.protocol import ServingError

# Liveness probes stay open: a load balancer checking them has no token (the V2 ones too).
OPEN_PATHS = frozenset({"/ping", "/health", "/v2/health/live", "/v2/health/ready"})


class AuthMiddleware:
    """Answers 401 to HTTP requests without ``Authorization: Bearer <token>``, except on open paths.

    With no token configured every request passes. ``token_sha256`` (hex) instead of ``token``: the
    replica knows only the token's hash (the Ray engine keeps the secret itself out of the cluster's
    state) and compares the hash of what is supplied, in constant time too.
    """

    def __init__(self, app: ASGIApp, token: str | None, open_paths: frozenset[str] = OPEN_PATHS,
                 token_sha256: str | None = None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.digest = bytes.fromhex(token_sha256) if token_sha256 else None
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        auth = self.token is not None or self.digest is not None
        if scope["type"] != "http" or not auth or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        supplied = b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                supplied = value
                break
        scheme, _, credential = supplied.partition(b" ")
        credential = credential.strip()
        if self.digest is not None:
            granted = hmac.compare_digest(hashlib.sha256(credential).digest(), self.digest)
        else:
            granted = hmac.compare_digest(credential, self.token or b"")
        if scheme.lower() == b"bearer" and granted:
            await self.app(scope, receive, send)
            return
        error = ServingError(401, "UNAUTHENTICATED",
                             "Missing or invalid bearer token: send 'Authorization: Bearer <token>'.")
        # Open Inference Protocol clients read errors as {"error": "..."}.
        body = json.dumps({"error": error.message}).encode() if scope["path"].startswith("/v2") else error.body()
        response = Response(body, status_code=401, media_type="application/json",
                            headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class Drainable(Protocol):
    draining: bool


class DrainMiddleware:
    """While ``state.draining`` is set, every HTTP response carries ``Connection: close``.

    Keep-alive clients then reconnect, and so reach a worker that stays.
    """

    def __init__(self, app: ASGIApp, state: Drainable) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.state.draining:
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_closing)
