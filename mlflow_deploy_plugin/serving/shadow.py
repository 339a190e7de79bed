"""The shadow mirror: a copy of answered requests predicted by a shadow version, off the request path.

``-C shadow=models:/churn/5`` loads a second version beside the served one. It answers nobody: after
the primary's answer is built, the request's already decoded input is handed to
:meth:`ShadowMirror.submit`, which only appends it to a bounded queue (never blocks, never raises).
One dispatcher thread predicts the copies and hands each answer, with the *original*
request id and role ``shadow``, to capture; the primary's row carries role ``primary``, so the two
join exactly on ``_request_id`` (see :mod:`mlflow_deploy_plugin.shadow`).

What a shadow may never do is touch the primary:
- under pressure copies are dropped, not queued without bound (``queue_full``, counted);
- every shadow call runs on its own thread with the deployment's ``timeout_s``: a call that raises is
  captured with status 500, one that does not return in time with 504; while a hung call still runs,
  new copies are dropped (``busy``) rather than piled behind it, and the worker's hung-call watchdog
  never sees the shadow (it watches the served versions only), so a hung shadow never restarts a
  worker;
- the shadow's failures and drops are counted (Prometheus) and its rows carry their status.

Copies that wait together are predicted in one call (``batching``, for row-wise models as the
primary's batching decides: ``pyfunc.predict`` costs ~1 ms per call whatever the rows, so this is
what keeps a shadow's CPU, and the GIL it holds, small beside the primary's); a batch that fails is
predicted again copy by copy, so one bad request never fails the others. The shadow process hands
its copies over as they travelled, in runs (:class:`CopyRun`: the raw rows of many copies in one
array, :meth:`ShadowMirror.submit_run`): a batch of runs is one DataFrame built from their arrays,
and no copy of them gets a DataFrame of its own unless a retry or capture needs one (a DataFrame
per copy was most of the shadow process's CPU per copy).

Only requests whose primary answer capture accepted are mirrored (so every shadow row has its pair),
and of those ``-C shadow_sample_rate``.

Where it runs: on the local engine, in a process of its own beside each worker
(:mod:`mlflow_deploy_plugin.engines.local.shadow_process`: the worker only hands copies over a
bounded pipe, so the shadow's predict never holds the serving process's GIL; the same guarantees
hold, plus ``crashed`` drops for copies a dead or silent shadow process took and never answered).
On the Ray engine, the same process beside each replica (``engines/ray/ingress.py``). Without a
``shadow_starter`` (in-process tests), in the serving process as described above.
"""

from __future__ import annotations

import functools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

_logger = logging.getLogger(__name__)

ROLE_PRIMARY = "primary"
ROLE_SHADOW = "shadow"
# Why a copy was not predicted (the reason label of mlflow_deploy_shadow_dropped_requests_total).
DROP_QUEUE_FULL = "queue_full"
DROP_BUSY = "busy"  # a previous shadow call still hangs
DROP_CLOSED = "closed"
DROP_CRASHED = "crashed"  # the shadow process died (or was replaced, silent) holding the copy
# How one shadow call ended (the outcome label of mlflow_deploy_shadow_requests_total).
OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"
OUTCOME_TIMEOUT = "timeout"



class CopyDropHook(Protocol):
    """Counts request copies the shadow did not predict: ``on_drop(reason=..., count=...)``.

    Always called with keywords, and its parameters must be named so (mypy checks it): the capture
    writer's drop hook (:class:`..capture.writer.CaptureDropHook`) takes a count and a reason too,
    in the other order, and a hook passed to the wrong one failed silently (inside a suppress)."""

    def __call__(self, *, reason: str, count: int) -> None:
        """Count ``count`` copies not predicted for ``reason`` (cheap, thread-safe)."""


@dataclass(frozen=True, slots=True)
class ShadowAnswer:
    """One shadow prediction, in the shape capture records (``capture.arrow.AnsweredRequest``)."""

    request_id: str  # the primary request's id: the pair's key
    timestamp: float  # the primary answer's time, so both rows fall in the same report window
    model_version: str
    status: int  # 200, 500 (the shadow raised) or 504 (it did not answer within timeout_s)
    latency_ms: float
    # None for a copy of a run whose raw_inputs capture encodes as they are (numeric answers): its
    # DataFrame is never built (see ShadowMirror._finish).
    inputs: Any
    predictions: Any
    role: str = ROLE_SHADOW
    model_name: str | None = None  # the shadow's registered model (it may differ from the primary's)
    raw_inputs: Any = None  # (columns, float64 array) ``inputs`` was built on: capture encodes it as is


@dataclass(frozen=True, slots=True)
class _Copy:
    request_id: str
    timestamp: float
    inputs: Any  # None for a copy of a run: built from raw_inputs when something needs it (see _frame_of)
    params: dict[str, Any] | None = None  # the primary's params, so both versions answer the same question
    raw_inputs: Any = None  # the request's (columns, float64 array), when its parser's fast path built one


@dataclass(frozen=True, slots=True)
class CopyRun:
    """Consecutive request copies with the same columns and no params, their rows in one array.

    What the shadow process's channel delivers (``serving.shadow_channel.pack_copies``) and
    :meth:`ShadowMirror.submit_run` takes as it is: copy ``i`` is ``request_ids[i]``, answered at
    ``timestamps[i]``, its rows the next ``counts[i]`` rows of ``values`` (float64, rows x
    ``columns``), exactly as its parser's fast path read them.
    """

    columns: tuple
    request_ids: list[str]
    timestamps: list[float]
    counts: list[int]
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.request_ids)

    def split(self, max_rows: int) -> list[CopyRun]:
        """This run cut, between copies, into runs of at most ``max_rows`` rows (a copy larger than
        that alone); the arrays are views, nothing is copied."""
        if len(self.values) <= max_rows:
            return [self]
        pieces: list[CopyRun] = []
        first = row = start = 0
        for index, count in enumerate(self.counts):
            if index > first and row + count - start > max_rows:
                pieces.append(self._part(first, index, start, row))
                first, start = index, row
            row += count
        pieces.append(self._part(first, len(self.counts), start, row))
        return pieces

    def _part(self, first: int, end: int, start: int, stop: int) -> CopyRun:
        return CopyRun(self.columns, self.request_ids[first:end], self.timestamps[first:end], self.counts[first:end],
                       self.values[start:stop])

    def head(self, copies: int) -> CopyRun:
        """The run of its first ``copies`` copies."""
        return self._part(0, copies, 0, sum(self.counts[:copies]))

    def copies(self) -> list[_Copy]:
        """Its copies, one by one (their inputs left to be built from their rows when needed)."""
        out, start = [], 0
        for request_id, timestamp, count in zip(self.request_ids, self.timestamps, self.counts, strict=True):
            out.append(_Copy(request_id, timestamp, None, None, (self.columns, self.values[start:start + count])))
            start += count
        return out


def frame_of_raw(columns: tuple, values: np.ndarray, copy: bool = False) -> Any:
    """The DataFrame a parser's fast path builds on ``(columns, float64 rows x columns array)``:
    on ``values`` itself (pandas does not copy a 2-D array), or on a copy of them with ``copy``."""
    import pandas as pd

    from mlflow_deploy_plugin.serving.frames import mark_float64

    return mark_float64(pd.DataFrame(values, columns=list(columns), copy=copy))


def _frame_of(copy: _Copy) -> Any:
    """The inputs the shadow model is given for ``copy``: rows of its own when the copy has raw rows.

    The copy's DataFrame would otherwise be built on the primary's request rows: a shadow model that
    changed its input in place would rewrite them under whoever still reads them (capture copies
    them when it records: :class:`..capture.batch.LayoutBuffer`). One copy per call, on the
    dispatcher thread."""
    if copy.raw_inputs is not None:
        columns, values = copy.raw_inputs
        return frame_of_raw(columns, values, copy=True)
    return copy.inputs


def _own_output(output: Any) -> Any:
    """``output`` as an array of its own: a model may hand back one buffer it reuses call after call,
    and capture holds the predictions until its writer thread encodes them."""
    return output.copy() if isinstance(output, np.ndarray) else output


class MirrorFront:
    """The request path's side of a mirror, shared by :class:`ShadowMirror` and the local engine's
    shadow process: which copies are taken, and that taking one never blocks and never raises.

    A subclass sets ``sample_rate``, ``_rng``, ``_closed`` and ``submitted`` and provides
    :meth:`_enqueue` (hand the copy over without blocking; False when dropped, counted) and
    :meth:`_drop` (count copies not predicted, by reason: a run of them in one call).
    """

    sample_rate: float
    submitted: int
    _closed: bool
    _rng: random.Random

    def submit(self, answer: Any) -> bool:
        """Queue a copy of an answered request (anything with request_id, timestamp and inputs).

        Never blocks and never raises: returns whether the copy was queued (False when it had no
        decoded input, was sampled out, or was dropped: counted).
        """
        try:
            if self._closed:
                self._drop(DROP_CLOSED)
                return False
            if answer.inputs is None:
                return False
            if self.sample_rate < 1.0 and self._rng.random() >= self.sample_rate:
                return False
            if not self._enqueue(answer):
                return False
            self.submitted += 1
            return True
        except Exception:  # the primary answers whatever happens here
            _logger.exception("Shadow mirror could not queue a request copy")
            return False

    def _enqueue(self, answer: Any) -> bool:
        raise NotImplementedError

    def _drop(self, reason: str, count: int = 1) -> None:
        raise NotImplementedError


class ShadowMirror(MirrorFront):
    """Owns the queue of request copies and the thread that predicts them with the shadow version."""

    def __init__(self, predict: Callable[[Any, dict[str, Any] | None], Any], version: str, record: Callable[[ShadowAnswer], object], *,
                 sample_rate: float = 1.0, max_queue: int = 256, timeout_s: float = 60.0,
                 on_drop: CopyDropHook | None = None,
                 on_result: Callable[[str, float, int], None] | None = None,
                 rng: random.Random | None = None, batching: bool = False, max_batch_rows: int = 4096,
                 model_name: str | None = None, batch_wait_s: float = 0.0) -> None:
        """``predict(inputs, params)`` is the shadow slot's predict; ``record`` gets every :class:`ShadowAnswer`
        (naming ``model_name`` and ``version``); ``on_drop(reason, copies)`` and
        ``on_result(outcome, seconds, copies)`` feed the metrics (cheap, thread-safe; a batch's or a
        run's copies are counted in one call). With ``batching``, ``batch_wait_s`` is how long the
        dispatcher waits for more copies to join a batch (0: only the ones already waiting; the
        shadow process, which answers nobody, waits a little to make fewer calls)."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if max_queue < 1 or not timeout_s > 0:
            raise ValueError("max_queue must be >= 1 and timeout_s > 0")
        self.version = version
        self.model_name = model_name
        self.sample_rate = sample_rate
        self.timeout_s = timeout_s
        self.batching = batching and max_batch_rows > 1
        self.max_batch_rows = max_batch_rows
        self.batch_wait_s = max(0.0, batch_wait_s)
        self._predict = predict
        self._record = record
        self._on_drop = on_drop
        self._on_result = on_result
        self._rng = rng or random.Random()
        self.max_queue = max_queue
        # Copies or runs of copies; bounded in copies by _waiting (a run counts as its copies).
        self._queue: queue.Queue[_Copy | CopyRun | None] = queue.Queue()
        self._space = threading.Lock()
        self._waiting = 0  # copies queued, not yet taken by the dispatcher
        self._running: Future[Any] | None = None  # the last call: while it runs, copies are dropped
        self._closed = False
        self.submitted = 0
        self.dropped: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="shadow-mirror", daemon=True)
        self._thread.start()

    # ---- request path ------------------------------------------------------------------------

    def _enqueue(self, answer: Any) -> bool:
        copy = _Copy(str(answer.request_id), float(answer.timestamp), answer.inputs,
                     getattr(answer, "params", None) or None, getattr(answer, "raw_inputs", None))
        with self._space:
            full = self._waiting >= self.max_queue
            if not full:
                self._waiting += 1
        if full:
            self._drop(DROP_QUEUE_FULL)
            return False
        self._queue.put_nowait(copy)
        return True

    def submit_run(self, run: CopyRun) -> int:
        """Queue a run of copies as it is (one item, not one per copy); returns how many were queued.

        As :meth:`submit`, never blocks and never raises; the copies the queue has no room for (the
        last ones) are dropped as ``queue_full``, counted. Not sampled: the shadow process's mirror
        gets the copies the worker's side already sampled.
        """
        try:
            if self._closed:
                self._drop(DROP_CLOSED, len(run))
                return 0
            with self._space:
                taken = min(len(run), max(0, self.max_queue - self._waiting))
                self._waiting += taken
            if taken < len(run):
                self._drop(DROP_QUEUE_FULL, len(run) - taken)
            if taken:
                kept = run if taken == len(run) else run.head(taken)
                # A run larger than a batch goes as several (a batch is at most max_batch_rows rows).
                for part in kept.split(self.max_batch_rows) if self.batching else (kept,):
                    self._queue.put_nowait(part)
            self.submitted += taken
            return taken
        except Exception:  # the shadow process goes on with the next copies whatever happens here
            _logger.exception("Shadow mirror could not queue a run of request copies")
            return 0

    def _taken(self, item: _Copy | CopyRun) -> None:
        """``item`` left the queue: its copies free their room."""
        with self._space:
            self._waiting -= len(item) if isinstance(item, CopyRun) else 1

    # ---- the dispatcher thread ---------------------------------------------------------------

    def _drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        if self._on_drop is not None:
            try:
                # One call for the whole run: a call per copy cost a run of N drops N metric updates,
                # and a hook failing partway left the metric short of the tally.
                self._on_drop(reason=reason, count=count)
            except Exception:
                _logger.exception("Shadow drop counter failed")

    def _run(self) -> None:
        while True:
            copy = self._queue.get()
            if copy is None:
                self._queue.task_done()
                return
            self._taken(copy)
            batch, stop = self._gather(copy)
            try:
                self._many(batch)
            except Exception:  # never let one batch stop the mirror
                _logger.exception("Shadow prediction of %d request copies could not be handled", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                self._queue.task_done()
                return

    def _gather(self, first: _Copy | CopyRun) -> tuple[list[_Copy | CopyRun], bool]:
        """``first`` and the copies waiting behind it (up to ``max_batch_rows`` rows), and whether the
        stop sentinel was among them."""
        batch, rows = [first], _rows(first)
        deadline = time.monotonic() + self.batch_wait_s
        while self.batching and rows < self.max_batch_rows:
            try:
                wait = deadline - time.monotonic()
                copy = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if copy is None:
                return batch, True
            self._taken(copy)
            batch.append(copy)
            rows += _rows(copy)
        return batch, False

    def _many(self, batch: list[_Copy | CopyRun]) -> None:
        """Predict a batch: runs in one call per set of columns, other copies as they stack."""
        if not self.batching:  # one item at a time (see _gather): a run's copies each on its own
            for item in batch:
                for copy in item.copies() if isinstance(item, CopyRun) else (item,):
                    self._one(copy)
            return
        runs: dict[tuple, list[CopyRun]] = {}
        copies: list[_Copy] = []
        for item in batch:
            if isinstance(item, CopyRun):
                runs.setdefault(item.columns, []).append(item)
            else:
                copies.append(item)
        for group in runs.values():
            self._runs(group)
        if copies:
            self._copies(copies)

    def _runs(self, group: list[CopyRun]) -> None:
        """Predict runs with the same columns in one call, on one DataFrame built from their arrays."""
        copies = [copy for run in group for copy in run.copies()]
        if self._busy():
            self._drop(DROP_BUSY, len(copies))
            return
        # Rows of the call's own (concatenate makes them; one run's are copied): the copies' raw rows,
        # views of the runs', wait in capture until its writer encodes them (see _frame_of).
        values = group[0].values.copy() if len(group) == 1 else np.concatenate([run.values for run in group])
        self._stacked(copies, frame_of_raw(group[0].columns, values), [count for run in group for count in run.counts])

    def _copies(self, batch: list[_Copy]) -> None:
        """Predict copies handed over one by one: stacked in one call when they can be."""
        if len(batch) == 1 or not _stackable(batch):
            for copy in batch:
                self._one(copy)
            return
        if self._busy():
            self._drop(DROP_BUSY, len(batch))
            return
        from mlflow_deploy_plugin.serving.frames import stack_frames

        self._stacked(batch, stack_frames([copy.inputs for copy in batch]), [len(copy.inputs) for copy in batch])

    def _busy(self) -> bool:
        """Whether the last call still hangs: queueing behind it would only pile up."""
        return self._running is not None and not self._running.done()

    def _stacked(self, batch: list[_Copy], inputs: Any, sizes: list[int]) -> None:
        """One call for the copies whose rows ``inputs`` stacks (``sizes`` rows each), its output cut back."""
        started = time.perf_counter()
        self._running = self._call(inputs, None)
        try:
            output = self._running.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._finish(batch, [None] * len(batch), 504, OUTCOME_TIMEOUT, started)
            return
        except Exception:
            pieces = None
        else:
            from mlflow_deploy_plugin.serving.batching import _split_output

            pieces = _split_output(_own_output(output), sizes)
        if pieces is None:  # failed or not row-aligned: each copy on its own, so only a bad one fails
            for copy in batch:
                self._one(copy)
            return
        self._finish(batch, pieces, 200, OUTCOME_OK, started)

    def _finish(self, batch: list[_Copy], pieces: list[Any], status: int, outcome: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        if outcome == OUTCOME_TIMEOUT:
            _logger.warning("Shadow v%s did not answer %d request copies within timeout_s=%gs; copies are "
                            "dropped until it returns.", self.version, len(batch), self.timeout_s)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + len(batch)
        if self._on_result is not None:
            self._on_result(outcome, elapsed, len(batch))
        latency_ms = elapsed * 1000.0
        for copy, predictions in zip(batch, pieces, strict=True):
            inputs = copy.inputs
            if inputs is None and not _captured_raw(copy.raw_inputs, predictions):
                inputs = frame_of_raw(*copy.raw_inputs)
            self._record(ShadowAnswer(copy.request_id, copy.timestamp, self.version, status, latency_ms,
                                      inputs, predictions, model_name=self.model_name, raw_inputs=copy.raw_inputs))

    def _one(self, copy: _Copy) -> None:
        """Predict one copy on its own (a batch of one, or a copy of a batch that failed)."""
        if self._busy():
            self._drop(DROP_BUSY)
            return
        inputs = _frame_of(copy)
        started = time.perf_counter()
        self._running = self._call(inputs, copy.params)
        status, outcome, predictions = 200, OUTCOME_OK, None
        try:
            predictions = _own_output(self._running.result(timeout=self.timeout_s))
        except FutureTimeout:
            status, outcome = 504, OUTCOME_TIMEOUT
            _logger.warning("Shadow v%s did not answer request %s within timeout_s=%gs; copies are dropped "
                            "until it returns.", self.version, copy.request_id, self.timeout_s)
        except Exception as exc:
            status, outcome = 500, OUTCOME_ERROR
            _logger.warning("Shadow v%s failed on request %s: %s: %s", self.version, copy.request_id,
                            type(exc).__name__, str(exc)[:200])
        elapsed = time.perf_counter() - started
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if self._on_result is not None:
            self._on_result(outcome, elapsed, 1)
        self._record(ShadowAnswer(copy.request_id, copy.timestamp, self.version, status, elapsed * 1000.0,
                                  inputs, predictions, model_name=self.model_name, raw_inputs=copy.raw_inputs))

    def _call(self, inputs: Any, params: dict[str, Any] | None) -> Future[Any]:
        """One shadow call on a daemon thread of its own: a call that never returns must not keep the
        worker process from exiting (an executor's threads are joined at interpreter exit)."""
        future: Future[Any] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self._predict(inputs, params))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, name="shadow-predict", daemon=True).start()
        return future

    def idle(self) -> bool:
        """Whether no copy waits or is being handled (a hung call left behind does not count)."""
        return self._queue.unfinished_tasks == 0

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking copies; predict what is queued for up to ``timeout_s``, drop (count) the rest."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
                break
            except queue.Full:
                break
        self._thread.join(max(0.0, deadline - time.monotonic()))
        while True:  # what the thread did not reach in time
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._taken(item)
                self._drop(DROP_CLOSED, len(item) if isinstance(item, CopyRun) else 1)


def _rows(item: _Copy | CopyRun) -> int:
    if isinstance(item, CopyRun):
        return max(len(item.values), 1)
    try:
        return max(len(item.inputs), 1)
    except TypeError:
        return 1


# Capture's compact spool record holds at most 64 KiB of column names (capture.spool): below this
# bound (counting 4 bytes a character and 8 a name, more than their pickle takes) it surely fits.
_COMPACT_NAME_BYTES = 60_000


@functools.lru_cache(maxsize=64)
def _fits_compact(columns: tuple) -> bool:
    return bool(columns) and sum(4 * len(str(name)) + 8 for name in columns) <= _COMPACT_NAME_BYTES


def _captured_raw(raw: tuple, predictions: Any) -> bool:
    """Whether capture records a copy of a run from its raw rows alone (its compact record: numeric
    predictions, one per row, or none), so its DataFrame need not be built; else capture needs it."""
    columns, values = raw
    rows = len(values)
    if not rows or not _fits_compact(columns):
        return False
    return predictions is None or (
        isinstance(predictions, np.ndarray) and predictions.dtype.kind in "biuf" and predictions.ndim in (1, 2)
        and len(predictions) == rows)


def _stackable(batch: list[_Copy]) -> bool:
    """Whether the copies are DataFrames with the same columns and no params (what one predict call
    may take: params apply to a whole call, as the primary's batcher also decides)."""
    import pandas as pd

    first = batch[0].inputs
    return isinstance(first, pd.DataFrame) and not any(copy.params for copy in batch) and all(
        isinstance(copy.inputs, pd.DataFrame) and copy.inputs.columns.equals(first.columns) for copy in batch)
