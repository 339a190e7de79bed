"""Batching on Ray replicas: Serve's own ``@serve.batch`` gathers the requests, ours predicts them.

Where it fits: the requests a replica may coalesce (row-wise models, see
``serving/batching.py``: DataFrames without params, smaller than ``max_batch_rows``). The ingress
is an ASGI app, so Serve cannot hand the app a list of requests; ``serve.batch`` is used one
level down instead, on the predict call every protocol's route ends in, in the replica's event
loop. What each side does:

- **Serve** (``serve.batch``) gathers the waiting requests into one batch, bounded by rows
  (``batch_size_fn``: the rows of the frames, up to ``-C max_batch_rows``), one batch at a time
  per replica (``max_concurrent_batches=1``), without waiting for a batch to fill
  (``batch_wait_timeout_s=0``): a lone request is predicted at once, and the requests that arrive
  while a batch predicts form the next one, as on the local engine. Serve reports its batches in
  Ray's own metrics (``serve_batch_queue_length``, ``serve_batch_utilization_percent``...).
- **Ours** (:class:`BatchingPredictor`) keeps what ``serve.batch`` does not do: the bounded queue
  (``-C max_queue``: a 503 at once instead of piling up memory), stacking the frames into one
  ``predict`` call on the predict thread (off the event loop), cutting the output back per
  request, and, when a batch fails, predicting its requests one by one so a bad request fails
  alone (``serve.batch`` would fail them all), or turning batching off for a model whose output
  cannot be cut back.

Requests that may not share a call (params, non-DataFrame inputs, one as large as
``max_batch_rows``, batching off) take the solo path of :class:`BatchingPredictor` on the same
predict thread. One difference stays: a request whose caller gave up while it waited in Serve's
batch queue is still predicted (``serve.batch`` has no way to withdraw an item), where the local
engine's queue drops it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pandas as pd
from ray import serve

from mlflow_deploy_plugin.serving.batching import BatchingPredictor, QueueFull, _Pending, _rows


class ServeBatchingPredictor(BatchingPredictor):
    """A :class:`BatchingPredictor` whose coalescing is Serve's ``@serve.batch``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gathered = 0  # requests handed to serve.batch and not answered yet
        self._batched: Any = serve.batch(max_batch_size=max(self._max_rows, 1), batch_wait_timeout_s=0.0,
                                         max_concurrent_batches=1, batch_size_fn=_total_rows)(self._predict_gathered)

    @property
    def queued(self) -> int:
        return super().queued + self._gathered

    @property
    def full(self) -> bool:
        return self.queued >= self.max_queue

    async def predict(self, data: Any, params: dict[str, Any] | None) -> Any:
        if (not self.batching or params or not isinstance(data, pd.DataFrame) or len(data) == 0
                or len(data) >= self._max_rows):
            return await super().predict(data, params)  # alone, on the same predict thread
        if self.full:
            raise QueueFull(f"{self.queued} requests are already waiting for the model (max_queue={self.max_queue})")
        self._gathered += 1
        if self._gauge is not None:
            self._gauge.inc()
        try:
            ok, value = await self._batched(_Pending(data, None, False, None))  # type: ignore[arg-type]
        finally:
            self._gathered -= 1
            if self._gauge is not None:
                self._gauge.dec()
        if not ok:
            raise value
        return value

    async def _predict_gathered(self, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        """One batch as Serve gathered it: predicted together on the predict thread, or one by one
        if that fails (each caller gets its own answer or error)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._predict_batch, batch)


def _total_rows(batch: list[_Pending]) -> int:
    return sum(_rows(item.data) for item in batch)
