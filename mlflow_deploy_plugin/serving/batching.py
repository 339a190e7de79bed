"""Coalesce concurrent requests into one ``predict`` call, behind a bounded queue.

``pyfunc.predict`` has ~1 ms of fixed cost per call (schema enforcement rebuilds the frame, the
estimator validates it again) while the estimator itself predicts 10k rows about as fast as one.
Requests that arrive while a prediction runs are therefore queued and predicted together next,
concatenated into one DataFrame. Nothing waits for a batch to fill: a lone request is predicted
at once, so latency at low load is unchanged.

Before taking a batch, the batcher lets the event loop finish queueing what it has already received
(:meth:`BatchingPredictor._settle`: a few turns of the loop, microseconds when it is idle). The loop
(reading, parsing, answering: ~250 µs per request) and the predict thread share one GIL, so a
prediction started while the loop is still parsing a burst gains nothing; it only cuts the burst in
two, and the clients of each part then come back together, predicted apart: under steady load the
worker locked into 2-5 rows per call instead of 15-30 (issue 10), paying predict's fixed cost per
call several times per round of requests.

Coalescing is right only for models whose answer for a row does not depend on the other rows:
it is on by default for flavors known to be row-wise (:data:`ROW_WISE_FLAVORS`), off for custom
``python_function`` models unless the deployment says ``-C batching=true``. A batched output that
cannot be cut back into one answer per request is never predicted again: those requests fail, and
batching stops for that model.

Every request waits in one queue (``max_queue`` long): when it is full the next request is
refused at once (:class:`QueueFull`, a 503 with ``Retry-After``) rather than piling up memory, and
a request whose caller gave up (a timeout cancels it) leaves the queue at once.

All predictions of a worker run on one thread: threads fighting for the GIL is what makes
`mlflow models serve` slower as concurrency rises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlflow_deploy_plugin.serving.frames import stack_frames
from mlflow_deploy_plugin.serving.model_slot import ModelSlot

_logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 256
# A batch is taken once this many turns of the event loop in a row queued nothing new. Three, not
# one: a request readable on a socket is parsed into a task in one turn's I/O poll, and that task
# queues it only in the next turn (after the batcher's own turn); a client answered in one turn
# sends its next request, read in the turn after that.
SETTLE_QUIET_TURNS = 3
# Settling never holds the queued requests longer than this, even when every turn queues more.
SETTLE_MAX_S = 0.010
# MLmodel flavors whose predict answers each row on its own (estimators scoring samples one by
# one), so a batch of requests can be predicted together and cut back apart.
ROW_WISE_FLAVORS = frozenset({"sklearn", "xgboost", "lightgbm", "catboost", "h2o", "spark"})


def batching_default(flavors: Any) -> bool:
    """Whether a model with these MLmodel ``flavors`` may be batched when the deployment does not say."""
    try:
        return bool(ROW_WISE_FLAVORS.intersection(flavors or ()))
    except TypeError:
        return False


class QueueFull(Exception):
    """The queue in front of the model is full: the request is refused without waiting."""


class UnsplittableOutput(Exception):
    """A batched prediction's output is not one answer per row, so it cannot be shared out."""


def _rows(data: Any) -> int:
    try:
        return len(data)
    except TypeError:
        return 1


@dataclass(eq=False)  # compared by identity: a queued request is removed from the deque by itself
class _Pending:
    data: Any
    params: dict[str, Any] | None
    solo: bool  # predicted in a call of its own
    future: asyncio.Future = field(repr=False)


def _split_output(output: Any, sizes: list[int]) -> list[Any] | None:
    """Cut a batch's output back into per-request pieces, or None if it is not row-aligned."""
    total = sum(sizes)
    if isinstance(output, pd.DataFrame | pd.Series | np.ndarray | list) and len(output) == total:
        pieces, start = [], 0
        for size in sizes:
            piece = output.iloc[start:start + size] if isinstance(output, pd.DataFrame | pd.Series) \
                else output[start:start + size]
            if isinstance(piece, pd.DataFrame | pd.Series):
                piece = piece.reset_index(drop=True)
            pieces.append(piece)
            start += size
        return pieces
    return None


class BatchingPredictor:
    """Predicts for one model slot: a bounded queue, batching DataFrame requests that arrive together."""

    def __init__(self, slot: ModelSlot, executor: ThreadPoolExecutor, max_batch_rows: int,
                 on_batch: Callable[[int], None] | None = None, *, max_queue: int = DEFAULT_MAX_QUEUE,
                 batching: bool = True, queue_gauge: Any = None, settle_max_s: float = SETTLE_MAX_S) -> None:
        """``settle_max_s``: the longest :meth:`_settle` holds queued requests before a batch is taken."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue!r}")
        self.slot = slot
        self._on_batch = on_batch
        self._executor = executor
        self._max_rows = max_batch_rows
        self.max_queue = max_queue
        self.batching = batching and max_batch_rows > 1
        self._queue: deque[_Pending] = deque()
        self._gauge = queue_gauge  # a Prometheus gauge child (inc/dec) following len(self._queue)
        self._running = False
        self._enqueued = 0  # requests ever queued: settling watches it grow
        self._queued_rows = 0  # rows of the queued requests that may share a call: settling stops at a full batch
        self._settle_max_s = settle_max_s
        self.last_batch_sizes: list[int] = []

    @property
    def queued(self) -> int:
        """Requests waiting for the model (not counting the call running now)."""
        return len(self._queue)

    @property
    def full(self) -> bool:
        """Whether a new request would be refused now."""
        return len(self._queue) >= self.max_queue

    async def predict(self, data: Any, params: dict[str, Any] | None) -> Any:
        """Predict ``data``; DataFrames without params may share a call with other requests.

        Raises :class:`QueueFull` at once when ``max_queue`` requests are already waiting.
        """
        if self.full:
            raise QueueFull(f"{len(self._queue)} requests are already waiting for the model "
                            f"(max_queue={self.max_queue})")
        loop = asyncio.get_running_loop()
        solo = (not self.batching or bool(params) or not isinstance(data, pd.DataFrame) or len(data) == 0
                or len(data) >= self._max_rows)
        item = _Pending(data, params, solo, loop.create_future())
        self._queue.append(item)
        self._enqueued += 1
        if not solo:
            self._queued_rows += len(data)
        if self._gauge is not None:
            self._gauge.inc()
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        try:
            return await item.future
        finally:
            if not item.future.done():
                item.future.cancel()
            if item.future.cancelled():
                # The caller gave up (timeout, disconnect): free its place and its data now.
                with contextlib.suppress(ValueError):
                    self._queue.remove(item)
                    self._left_queue(item)

    def _predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """One ``predict`` call of the model, reported to ``on_batch`` with its row count."""
        if self._on_batch is not None:
            self._on_batch(_rows(data))
        return self.slot.predict(data, params)

    def _pop(self) -> _Pending:
        item = self._queue.popleft()
        self._left_queue(item)
        return item

    def _left_queue(self, item: _Pending) -> None:
        if self._gauge is not None:
            self._gauge.dec()
        if not item.solo:
            self._queued_rows -= len(item.data)

    def _take_batch(self) -> list[_Pending]:
        """The next requests to predict together: the first waiting one, and those that may join it."""
        while self._queue:
            first = self._pop()
            if first.future.done():
                continue
            batch, rows = [first], _rows(first.data)
            if first.solo or not self.batching:
                return batch
            while self._queue and not self._queue[0].solo and rows + len(self._queue[0].data) <= self._max_rows:
                item = self._pop()
                if item.future.done():
                    continue
                batch.append(item)
                rows += len(item.data)
            return batch
        return []

    async def _settle(self) -> None:
        """Let the event loop queue the requests it has already received before a batch is taken.

        Yields to the loop until ``SETTLE_QUIET_TURNS`` turns in a row queued nothing (at most
        ``settle_max_s``, or until half of ``max_queue`` waits, or a full batch: the predict thread
        must not idle beside one). Skipped when the next request will be predicted alone anyway.
        """
        if not self.batching or not self._queue or self._queue[0].solo or self._queue[0].future.done():
            return
        deadline = time.perf_counter() + self._settle_max_s
        quiet, seen = 0, self._enqueued
        while (quiet < SETTLE_QUIET_TURNS and len(self._queue) < self.max_queue // 2
               and self._queued_rows < self._max_rows and time.perf_counter() < deadline):
            await asyncio.sleep(0)  # one turn of the loop: its ready callbacks, then its I/O poll
            quiet = 0 if self._enqueued != seen else quiet + 1
            seen = self._enqueued

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            # A request that finds the model idle and nobody queued behind it is predicted at once: a
            # lone caller gains nothing from settling, and each turn of the loop releases the GIL to
            # the worker's other threads (a shadow's copy sender, capture's writer) for up to a
            # switch interval (p99 at c = 1 with a shadow 1.24x without it, measured). Settling is for
            # what follows a batch: the requests its answers bring back.
            first = len(self._queue) == 1
            while True:
                if not first:
                    await self._settle()
                first = False
                batch = self._take_batch()
                if not batch:
                    break
                try:
                    results = await loop.run_in_executor(self._executor, self._predict_batch, batch)
                except Exception as exc:  # never leave a caller waiting for an answer that won't come
                    _logger.exception("Predicting a batch of %d requests failed unexpectedly", len(batch))
                    results = [(False, exc)] * len(batch)
                for item, (ok, value) in zip(batch, results, strict=True):
                    if item.future.done():
                        continue
                    if ok:
                        item.future.set_result(value)
                    else:
                        item.future.set_exception(value)
        finally:
            self._running = False

    def _predict_batch(self, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        """Runs on the predict thread: one call for the batch, one per request if the batch failed."""
        self.last_batch_sizes = [_rows(item.data) for item in batch]
        if len(batch) > 1 and len({tuple(item.data.columns) for item in batch}) == 1:
            try:
                frame = stack_frames([item.data for item in batch])
                output = self._predict(frame)
            except Exception as exc:
                # One bad request must not fail its neighbours: retry each alone below (the batch
                # produced no answer, so no row is answered twice).
                _logger.debug("Batched predict failed (%s); predicting requests one by one", exc)
            else:
                pieces = _split_output(output, self.last_batch_sizes)
                if pieces is not None:
                    return [(True, piece) for piece in pieces]
                # Predicting these rows again could repeat side effects or answer differently: fail
                # them, and predict this model one request at a time from now on.
                self.batching = False
                _logger.warning("Model %s returned %s for a batch of %d requests, not one answer per row: "
                                "batching is now off for it (set -C batching=false).",
                                self.slot.identity.model_uri, type(output).__name__, len(batch))
                error = UnsplittableOutput(
                    "The model's output for a batch of requests could not be split into one answer per "
                    "request; batching is now off for this model version, so a retry is predicted alone. "
                    "Set -C batching=false for models that are not row-wise.")
                return [(False, error)] * len(batch)
        results = []
        for item in batch:
            try:
                results.append((True, self._predict(item.data, item.params)))
            except Exception as exc:
                results.append((False, exc))
        return results
