"""Coalesce concurrent requests into one ``predict`` call.

``pyfunc.predict`` has ~1 ms of fixed cost per call (schema enforcement rebuilds the frame, the
estimator validates it again) while the estimator itself predicts 10k rows about as fast as one.
Requests that arrive while a prediction runs are therefore queued and predicted together next,
concatenated into one DataFrame. Nothing waits for a batch to fill: a lone request is predicted
at once, so latency at low load is unchanged.

All predictions of a worker run on one thread: threads fighting for the GIL is what makes
`mlflow models serve` slower as concurrency rises.
"""

from __future__ import annotations

import asyncio
import logging
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


def _rows(data: Any) -> int:
    try:
        return len(data)
    except TypeError:
        return 1


@dataclass
class _Pending:
    frame: pd.DataFrame
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
    """Predicts for one model slot, batching DataFrame requests that arrive together."""

    def __init__(self, slot: ModelSlot, executor: ThreadPoolExecutor, max_batch_rows: int,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.slot = slot
        self._on_batch = on_batch
        self._executor = executor
        self._max_rows = max_batch_rows
        self._queue: deque[_Pending] = deque()
        self._running = False
        self.last_batch_sizes: list[int] = []

    async def predict(self, data: Any, params: dict[str, Any] | None) -> Any:
        """Predict ``data``; DataFrames without params may share a call with other requests."""
        loop = asyncio.get_running_loop()
        if (self._max_rows <= 1 or params or not isinstance(data, pd.DataFrame) or len(data) == 0
                or len(data) >= self._max_rows):
            return await self._run_alone(data, params)
        future = loop.create_future()
        self._queue.append(_Pending(data, future))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await future

    async def _run_alone(self, data: Any, params: dict[str, Any] | None) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._predict, data, params)

    def _predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """One ``predict`` call of the model, reported to ``on_batch`` with its row count."""
        if self._on_batch is not None:
            self._on_batch(_rows(data))
        return self.slot.predict(data, params)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch: list[_Pending] = []
                rows = 0
                while self._queue and (not batch or rows + len(self._queue[0].frame) <= self._max_rows):
                    item = self._queue.popleft()
                    if item.future.cancelled():
                        continue
                    batch.append(item)
                    rows += len(item.frame)
                if not batch:
                    continue
                results = await loop.run_in_executor(self._executor, self._predict_batch, batch)
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
        """Runs on the predict thread: one call for the batch, one per request as fallback."""
        self.last_batch_sizes = [len(item.frame) for item in batch]
        if len(batch) > 1 and len({tuple(item.frame.columns) for item in batch}) == 1:
            try:
                frame = stack_frames([item.frame for item in batch])
                pieces = _split_output(self._predict(frame), self.last_batch_sizes)
                if pieces is not None:
                    return [(True, piece) for piece in pieces]
            except Exception as exc:
                # One bad request must not fail its neighbours: retry each alone below.
                _logger.debug("Batched predict failed (%s); predicting requests one by one", exc)
        results = []
        for item in batch:
            try:
                results.append((True, self._predict(item.frame)))
            except Exception as exc:
                results.append((False, exc))
        return results
