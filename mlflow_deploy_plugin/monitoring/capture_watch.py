"""Turn "capture is dropping rows" into history events (and so into notifications).

Workers count the requests they could not capture (buffer full, write error) in the Prometheus
counter ``mlflow_deploy_capture_dropped_requests`` (multiprocess files under ``run/prometheus``),
and the local supervisor adds those a killed worker had answered but not yet spooled
(``engines/local/capture_loss.py``, which also writes ``capture_lost`` to the history); a worker
must not write history on its request path. The agent reads
the counter's files every ``interval_s`` and writes ``capture_dropping`` (with the rows dropped
since the last event) when it grew, at most once per ``quiet_s`` while it keeps growing, then
``capture_recovered`` once it stayed flat for ``quiet_s``. Engines without those files (Ray) are
skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mlflow_deploy_plugin.state import StateStore

_logger = logging.getLogger(__name__)
DROPPED_SAMPLE = "mlflow_deploy_capture_dropped_requests_total"


def dropped_total(metrics_dir: str, deployment: str) -> float | None:
    """The deployment's dropped-capture count summed over its workers' files; None without files."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    return registry.get_sample_value(DROPPED_SAMPLE, {"deployment": deployment})


class CaptureWatch:
    """Watches one deployment's dropped-capture counter; see the module docstring."""

    def __init__(self, store: StateStore, name: str, *, quiet_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.name = name
        self.quiet_s = quiet_s
        self.clock = clock
        self.last_total: float | None = None
        self.unreported = 0.0
        self.dropping_since_event: float | None = None  # clock of the last capture_dropping event
        self.last_growth = 0.0

    def observe(self, total: float | None) -> str | None:
        """Feed one reading; returns the event written, if any."""
        if total is None:
            return None
        now = self.clock()
        previous, self.last_total = self.last_total, total
        if previous is None:  # first reading: drops before the agent came are not news
            return None
        grown = total - previous if total >= previous else total  # files reset by a new supervisor
        if grown > 0:
            self.unreported += grown
            self.last_growth = now
            if self.dropping_since_event is None or now - self.dropping_since_event >= self.quiet_s:
                self.store.append_history(self.name, "capture_dropping", actor="capture-watch",
                                          dropped=int(self.unreported), reason=(
                                              f"{int(self.unreported)} request(s) not captured (buffer full, "
                                              "write error or a worker killed): drift and quality reports miss them"))
                self.unreported = 0.0
                self.dropping_since_event = now
                return "capture_dropping"
        elif self.dropping_since_event is not None and now - self.last_growth >= self.quiet_s:
            self.store.append_history(self.name, "capture_recovered", actor="capture-watch",
                                      dropped=int(self.unreported),
                                      reason=f"no request dropped from capture for {self.quiet_s:.0f}s")
            self.dropping_since_event = None
            self.unreported = 0.0
            return "capture_recovered"
        return None

    def run_forever(self, stop: threading.Event, interval_s: float = 15.0) -> None:
        metrics_dir = self.store.paths(self.name).metrics
        while not stop.wait(interval_s):
            if not metrics_dir.is_dir():
                continue
            try:
                self.observe(dropped_total(str(metrics_dir), self.name))
            except Exception as exc:  # a torn metrics file must not stop the agent
                _logger.warning("Capture watch of %s: %s", self.name, exc)
