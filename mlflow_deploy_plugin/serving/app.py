"""The serving app (ASGI): the MLflow scoring protocol plus health, deployment info and metrics.

``/ping``, ``/version`` and ``/invocations`` answer exactly as `mlflow models serve` does (a
drop-in); ``/deployment`` describes what is served (versions, traffic split).

The same app runs under the local engine's uvicorn workers and, later, as a Ray Serve ingress.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import mlflow
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp

from mlflow_deploy_plugin import __version__
from mlflow_deploy_plugin.serving import openapi_bodies, v2
from mlflow_deploy_plugin.serving.batching import (
    DEFAULT_MAX_QUEUE,
    BatchingPredictor,
    QueueFull,
    UnsplittableOutput,
    batching_default,
)
from mlflow_deploy_plugin.serving.decode_limits import DEFAULT_MAX_CELLS, DEFAULT_MAX_ROWS, DecodeLimits
from mlflow_deploy_plugin.serving.docs import add_docs
from mlflow_deploy_plugin.serving.metrics import ServingMetrics
from mlflow_deploy_plugin.serving.middleware import AuthMiddleware, DrainMiddleware
from mlflow_deploy_plugin.serving.model_slot import ModelSlot
from mlflow_deploy_plugin.serving.protocol import (
    ParsedRequest,
    ServingError,
    fast_path_columns,
    parse_request,
    prediction_error,
    predictions_body,
)

_logger = logging.getLogger(__name__)

JSON = "application/json"
# Bodies above this are parsed off the event loop so one large request cannot stall the others.
_INLINE_PARSE_BYTES = 256 * 1024
_MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class AppSettings:
    """What the app needs to know about its deployment."""

    deployment: str
    max_body_bytes: int
    timeout_s: float
    auth_token: str | None = None
    auth_token_sha256: str | None = None  # hex digest: the Ray replicas know only the hash
    max_batch_rows: int = 4096
    max_rows: int = DEFAULT_MAX_ROWS
    max_cells: int = DEFAULT_MAX_CELLS
    max_queue: int = DEFAULT_MAX_QUEUE
    batching: str = "auto"  # "auto": on for row-wise flavors only; "true"; "false"


@dataclass(slots=True)
class Answer:
    """What one `/invocations` request got, handed to the capture hook.

    Made for every request: slots (no ``__dict__`` to allocate and fill), and nothing adds attributes to it."""

    request_id: str
    timestamp: float
    model_version: str
    status: int
    latency_ms: float
    inputs: Any
    predictions: Any
    role: str = "primary"  # capture's _role: the shadow mirror's rows say "shadow" (serving/shadow.py)
    params: dict[str, Any] | None = None  # the request's params: the shadow predicts with the same ones
    model_name: str | None = None  # the registered model that answered (capture's _model_name)
    # (columns, float64 rows x columns array) ``inputs`` was built on, when the parser's fast path built
    # it (ParsedRequest.raw): capture encodes it without pandas calls.
    raw_inputs: Any = None


class ServiceState:
    """Mutable state shared by the routes and the worker process (draining on shutdown)."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False


def _error(status: int, error_code: str, message: str) -> Response:
    return Response(ServingError(status, error_code, message).body(), status_code=status, media_type=JSON)


def _queue_full(max_queue: int) -> ServingError:
    # Retry-After: the queue drains within a few predict calls once load drops.
    return ServingError(503, "TEMPORARILY_UNAVAILABLE",
                        f"The model's queue is full (max_queue={max_queue} requests waiting): retry after "
                        "the delay in Retry-After, send fewer concurrent requests, add workers or raise "
                        "-C max_queue.", headers={"Retry-After": "1"})


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ServingError(400, "BAD_REQUEST", f"Invalid Content-Length header {declared!r}.") from None
        if size > limit:
            raise ServingError(413, "REQUEST_LIMIT_EXCEEDED",
                               f"Request body of {size} bytes exceeds max_body_mb ({limit} bytes).")
    chunks, received = [], 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise ServingError(413, "REQUEST_LIMIT_EXCEEDED",
                                   f"Request body exceeds max_body_mb ({limit} bytes).")
            chunks.append(chunk)
    except ClientDisconnect:
        # Not a server error: no traceback in the log, counted under 499 like nginx does.
        raise ServingError(499, "CLIENT_CLOSED_REQUEST",
                           f"Client disconnected after sending {received} bytes of the body.") from None
    return b"".join(chunks)


def _row_count(data: Any) -> int:
    try:
        return len(data)
    except TypeError:
        return 1


# How a protocol turns a body into model input, and predictions into its answer (see `answer` in build_app).
Decoder = Callable[[bytes, Headers, ModelSlot, "frozenset[str] | None"], ParsedRequest]
Encoder = Callable[[Any, ParsedRequest, ModelSlot], Response]


@dataclass
class _Route:
    """One served version: its slot, predictor, share of traffic and metric children."""

    slot: ModelSlot
    weight: float
    predictor: BatchingPredictor
    fast_columns: frozenset[str] | None
    latency: Any
    success_latency: Any
    rows: Any


def build_app(
    settings: AppSettings,
    slots: ModelSlot | list[tuple[ModelSlot, float]],
    *,
    state: ServiceState | None = None,
    metrics: ServingMetrics | None = None,
    on_answer: Callable[[Answer], object] | None = None,  # its return value is ignored
    rng: random.Random | None = None,
    add_routes: Callable[[FastAPI, Callable[[Request], Awaitable[bytes]]], object] | None = None,
    shadow: dict[str, Any] | None = None,
) -> ASGIApp:
    """Build the ASGI app serving one slot, or several with weights (a canary split).

    Each request goes to a slot drawn by weight, or to the version named in an
    ``X-Model-Version`` request header. ``on_answer`` sees every /invocations answer.
    ``add_routes(app, read_body)`` adds more routes (e.g. ``POST /labels``) reading bodies under the same limit.
    ``shadow`` describes the shadow version on /deployment (the mirror itself hangs off ``on_answer``).
    """
    state = state or ServiceState()
    metrics = metrics or ServingMetrics()
    weighted = [(slots, 100.0)] if isinstance(slots, ModelSlot) else list(slots)
    if not weighted or any(weight < 0 for _, weight in weighted) or sum(w for _, w in weighted) <= 0:
        raise ValueError("build_app needs at least one slot and positive weights")
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
    parse_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parse")
    deployment = settings.deployment
    batch_rows = metrics.batch_rows.labels(deployment)
    routes = []
    for slot, weight in weighted:
        identity = slot.identity
        version = identity.model_version
        metrics.model_info.labels(deployment, identity.model_name, version, identity.model_uri).set(1)
        batching = settings.batching == "true" or (
            settings.batching == "auto" and batching_default(slot.metadata.flavors))
        predictor = BatchingPredictor(slot, executor, settings.max_batch_rows, on_batch=batch_rows.observe,
                                      max_queue=settings.max_queue, batching=batching,
                                      queue_gauge=metrics.queued.labels(deployment))
        routes.append(_Route(slot, weight, predictor, fast_path_columns(slot.input_schema),
                             metrics.latency.labels(deployment, version),
                             metrics.success_latency.labels(deployment, version),
                             metrics.rows.labels(deployment, version)))
    by_version = {route.slot.identity.model_version: route for route in routes}
    primary = max(routes, key=lambda route: route.weight)
    total_weight = sum(route.weight for route in routes)
    cumulative, running = [], 0.0
    for route in routes:
        running += route.weight
        cumulative.append(running)
    draw = (rng or random.Random()).random
    limits = DecodeLimits(settings.max_rows, settings.max_cells)
    in_flight = metrics.in_flight.labels(deployment)
    request_counters: dict[tuple[str, int], Any] = {}
    identity = primary.slot.identity
    deployment_body = json.dumps({
        "deployment": deployment,
        "model_name": identity.model_name,
        "model_version": identity.model_version,
        "model_uri": identity.model_uri,
        "requested_uri": identity.requested_uri,
        "run_id": identity.run_id,
        "traffic": [{"model_name": r.slot.identity.model_name, "model_version": r.slot.identity.model_version,
                     "percent": round(100.0 * r.weight / total_weight, 3)} for r in routes],
        **({"shadow": shadow} if shadow else {}),  # only with a shadow version: the body's shape stays
        "plugin_version": __version__,
        "mlflow_version": mlflow.__version__,
    }).encode()
    health_body = json.dumps({"status": "ok", "model_version": identity.model_version}).encode()

    def choose(request: Request) -> _Route:
        wanted = request.headers.get("x-model-version")
        if wanted is not None:
            route = by_version.get(wanted)
            if route is None:
                raise ServingError(400, "INVALID_PARAMETER_VALUE",
                                   f"X-Model-Version {wanted!r} is not served here; served: "
                                   f"{', '.join(by_version)}.")
            return route
        if len(routes) == 1:
            return primary
        point = draw() * total_weight
        return routes[bisect.bisect_right(cumulative, point) if point < total_weight else -1]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        executor.shutdown(wait=True)
        parse_executor.shutdown(wait=True)

    # /openapi.json and /docs describe every route (V2 included) for schema-driven tools and fuzzers;
    # /docs is ours (add_docs): FastAPI's loads Swagger UI from a CDN.
    app = FastAPI(title=f"mlflow-deploy: {deployment}", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", lifespan=lifespan)
    add_docs(app)
    app.state.service = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "ENDPOINT_NOT_FOUND", 405: "BAD_REQUEST"}.get(exc.status_code, "BAD_REQUEST")
        error = ServingError(exc.status_code, code, str(exc.detail))
        return v2.error_response(error) if v2.is_v2_path(request.scope["path"]) else mlflow_fail(error)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(b"\n", media_type=JSON)

    @app.get("/health")
    async def health() -> Response:
        if state.ready and not state.draining:
            return Response(health_body, media_type=JSON)
        return _error(503, "TEMPORARILY_UNAVAILABLE", "draining" if state.draining else "model not ready")

    @app.get("/version")
    async def mlflow_version() -> Response:
        # Exactly `mlflow models serve`'s answer (the bare version, labelled JSON): its clients read it so.
        return Response(mlflow.__version__, media_type=JSON)

    @app.get("/deployment")
    async def deployment_info() -> Response:
        return Response(deployment_body, media_type=JSON)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def answer(request: Request, decode: Decoder, encode: Encoder, fail: Callable[[ServingError], Response],
                     version: str | None = None) -> Response:
        """One prediction request, whatever its protocol: ``decode`` the body, predict on the chosen
        version (``version`` pins it), ``encode`` the predictions or ``fail`` with the error; the same
        slots, limits, queue, metrics, headers and capture for every protocol."""
        started = time.perf_counter()
        # A client's id is kept (labels join on it) but bounded: it is echoed and captured with every row.
        request_id = (request.headers.get("x-request-id") or "")[:_MAX_REQUEST_ID] or uuid.uuid4().hex
        in_flight.inc()
        data = predictions = params = raw = None
        route = primary
        try:
            route = by_version[version] if version is not None else choose(request)
            if route.predictor.full:  # shed load before reading the body: memory stays flat
                raise _queue_full(settings.max_queue)
            body = await _read_body(request, settings.max_body_bytes)
            if len(body) <= _INLINE_PARSE_BYTES:
                parsed = decode(body, request.headers, route.slot, route.fast_columns)
            else:
                parsed = await asyncio.get_running_loop().run_in_executor(
                    parse_executor, decode, body, request.headers, route.slot, route.fast_columns)
            del body  # the decoded data is what waits in the queue, not the bytes as well
            data, params, raw = parsed.data, parsed.params, parsed.raw
            try:
                # asyncio.timeout, not wait_for (which runs predict in a task of its own, a turn of
                # the loop later): the request joins the batcher's queue in this very step.
                async with asyncio.timeout(settings.timeout_s):
                    predictions = await route.predictor.predict(data, parsed.params)
            except TimeoutError:
                raise ServingError(504, "DEADLINE_EXCEEDED",
                                   f"Prediction took longer than timeout_s={settings.timeout_s:g}s.") from None
            except QueueFull:
                raise _queue_full(settings.max_queue) from None
            except UnsplittableOutput as exc:
                raise ServingError(500, "INTERNAL_ERROR", str(exc)) from None
            except ServingError:
                raise
            except Exception as exc:
                raise prediction_error(exc, data) from None
            response = encode(predictions, parsed, route.slot)
            route.rows.inc(_row_count(data))
        except ServingError as exc:
            response = fail(exc)
            predictions = None
        except Exception:
            # Never a bare "Internal Server Error", never the exception's text (it may quote the
            # input): a short JSON error, the details in the worker log under the request id.
            _logger.exception("Unexpected error answering request %s", request_id)
            response = fail(ServingError(
                500, "INTERNAL_ERROR",
                f"Unexpected error answering request {request_id[:64]}; the worker log has the details."))
            predictions = None
        finally:
            in_flight.dec()
        elapsed = time.perf_counter() - started
        identity = route.slot.identity
        version = identity.model_version
        route.latency.observe(elapsed)
        if 200 <= response.status_code < 300:
            route.success_latency.observe(elapsed)
        key = (version, response.status_code)
        counter = request_counters.get(key)
        if counter is None:  # labels() takes a lock and builds a tuple key: once per pair, not per request
            counter = request_counters[key] = metrics.requests.labels(deployment, version, str(key[1]))
        counter.inc()
        response.headers["x-request-id"] = request_id
        response.headers["x-model-version"] = version
        if on_answer is not None:
            on_answer(Answer(request_id, time.time(), version, response.status_code, elapsed * 1000.0,
                             data, predictions, params=params, model_name=identity.model_name, raw_inputs=raw))
        return response

    def mlflow_decode(body: bytes, headers: Headers, slot: ModelSlot,
                      fast_columns: frozenset[str] | None) -> ParsedRequest:
        return parse_request(body, headers.get("content-type"), slot.metadata, slot.input_schema, fast_columns,
                             limits)

    def mlflow_encode(predictions: Any, parsed: ParsedRequest, _: ModelSlot) -> Response:
        return Response(predictions_body(predictions, parsed.unwrapped_output), media_type=JSON)

    def mlflow_fail(exc: ServingError) -> Response:
        return Response(exc.body(), status_code=exc.status, media_type=JSON, headers=exc.headers)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        return await answer(request, mlflow_decode, mlflow_encode, mlflow_fail)

    v2.add_routes(app, v2.V2Service(deployment, identity.model_name, primary.slot.identity.model_version,
                                    {v: r.slot for v, r in by_version.items()}, state, limits), answer)

    if add_routes is not None:
        add_routes(app, lambda request: _read_body(request, settings.max_body_bytes))
    openapi_bodies.describe(app, primary.slot.input_schema)
    # Drain outermost: every answer of a draining worker says Connection: close, refusals included.
    return DrainMiddleware(AuthMiddleware(app, settings.auth_token, token_sha256=settings.auth_token_sha256), state)
