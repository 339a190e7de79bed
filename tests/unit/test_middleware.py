"""The serving app's ASGI middlewares, each alone around a trivial inner app, driven by raw ASGI calls."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pytest
from starlette.types import Receive, Scope, Send
from unit_helpers import asgi_call

from mlflow_deploy_plugin.serving.app import ServiceState
from mlflow_deploy_plugin.serving.middleware import OPEN_PATHS, AuthMiddleware, DrainMiddleware

TOKEN = "s3cret-token"


@dataclass
class Inner:
    """An ASGI app that answers 200 ``inner`` with one header of its own and records what reached it."""

    seen: list[Scope] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen.append(scope)
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"x-inner", b"1")]})
        await send({"type": "http.response.body", "body": b"inner"})


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


# Both ways a replica knows the token: itself (local workers) or only its SHA-256 (Ray replicas).
MODES = ("token", "sha256")


def guard(inner: Inner, mode: str) -> AuthMiddleware:
    if mode == "token":
        return AuthMiddleware(inner, TOKEN)
    return AuthMiddleware(inner, None, token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest())


# -- AuthMiddleware ---------------------------------------------------------------------------


def test_auth_without_a_token_lets_everything_through() -> None:
    inner = Inner()
    answer = asgi_call(AuthMiddleware(inner, None))
    assert answer is not None and (answer.status, answer.body) == (200, b"inner")
    assert len(inner.seen) == 1


@pytest.mark.parametrize(("case", "headers"), [
    ("no header", []),
    ("wrong token", bearer("wrong")),
    ("token prefix", bearer(TOKEN[:-1])),
    ("token plus more", bearer(TOKEN + "x")),
    ("basic scheme", [(b"authorization", f"Basic {TOKEN}".encode())]),
    ("no scheme", [(b"authorization", TOKEN.encode())]),
    ("empty bearer", [(b"authorization", b"Bearer ")]),
])
@pytest.mark.parametrize("mode", MODES)
def test_auth_refuses_requests_without_the_right_bearer_token(case: str, headers: list, mode: str) -> None:
    inner = Inner()
    answer = asgi_call(guard(inner, mode), headers=headers)
    assert answer is not None
    assert answer.status == 401, case
    assert answer.header(b"www-authenticate") == [b"Bearer"]
    assert answer.header(b"content-type") == [b"application/json"]
    body = json.loads(answer.body)
    assert body["error_code"] == "UNAUTHENTICATED"
    assert "Authorization: Bearer <token>" in body["message"]
    assert TOKEN not in answer.body.decode(), "the token must never be echoed"
    assert inner.seen == [], f"{case}: the inner app must not be reached"


@pytest.mark.parametrize("header", [
    f"Bearer {TOKEN}".encode(),
    f"bearer {TOKEN}".encode(),  # the scheme is case-insensitive (RFC 9110 11.1)
    f"BEARER  {TOKEN} ".encode(),
])
@pytest.mark.parametrize("mode", MODES)
def test_auth_lets_the_right_token_through(header: bytes, mode: str) -> None:
    inner = Inner()
    answer = asgi_call(guard(inner, mode), headers=[(b"authorization", header)])
    assert answer is not None and (answer.status, answer.body) == (200, b"inner")
    assert len(inner.seen) == 1


@pytest.mark.parametrize("path", ["/ping", "/health"])
def test_auth_leaves_liveness_probes_open(path: str) -> None:
    inner = Inner()
    answer = asgi_call(AuthMiddleware(inner, TOKEN), path=path)
    assert answer is not None and answer.status == 200
    assert path in OPEN_PATHS


@pytest.mark.parametrize("path", ["/version", "/metrics", "/ping/", "/healthz", "/no/such/path"])
@pytest.mark.parametrize("mode", MODES)
def test_auth_guards_every_other_path(path: str, mode: str) -> None:
    answer = asgi_call(guard(Inner(), mode), path=path)
    assert answer is not None and answer.status == 401


def test_auth_passes_lifespan_events_through() -> None:
    inner = Inner()
    assert asgi_call(AuthMiddleware(inner, TOKEN), scope_type="lifespan") is None
    assert [scope["type"] for scope in inner.seen] == ["lifespan"]


# -- DrainMiddleware --------------------------------------------------------------------------


def test_drain_changes_nothing_while_serving() -> None:
    state = ServiceState()
    answer = asgi_call(DrainMiddleware(Inner(), state))
    assert answer is not None
    assert answer.headers == [(b"content-type", b"text/plain"), (b"x-inner", b"1")]
    assert answer.body == b"inner"


def test_drain_adds_connection_close_and_keeps_the_inner_headers() -> None:
    state = ServiceState()
    app = DrainMiddleware(Inner(), state)
    state.draining = True
    answer = asgi_call(app)
    assert answer is not None and (answer.status, answer.body) == (200, b"inner")
    assert answer.headers == [(b"content-type", b"text/plain"), (b"x-inner", b"1"), (b"connection", b"close")]
    state.draining = False  # read per request, not when the middleware was built
    answer = asgi_call(app)
    assert answer is not None and answer.header(b"connection") == []


def test_drain_passes_lifespan_events_through() -> None:
    state = ServiceState()
    state.draining = True
    inner = Inner()
    assert asgi_call(DrainMiddleware(inner, state), scope_type="lifespan") is None
    assert [scope["type"] for scope in inner.seen] == ["lifespan"]
