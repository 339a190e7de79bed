"""The per-deployment drift-report lock: two reports never judge and tag the same version at once.

Its own module because both the scheduler (``schedule.py``) and the on-demand report
(``deployment_drift.py``) take it, and the scheduler runs the on-demand code: a lock in either of
them would make the two import each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Added to an exception (``add_note``) once the failed report is recorded as a FAILED MLflow run,
# so whoever catches it does not record a second one.
RUN_RECORDED = "the drift report run was recorded as FAILED in MLflow"

DRIFT_LOCK = "drift.lock"


@contextlib.contextmanager
def drift_lock(root: Path, *, wait: bool = True, timeout_s: float = 3600.0,
               say: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold the drift-report lock of the deployment folder ``root``; yields whether it is held.

    Every drift report of a deployment runs under it, so two reports never judge and tag the same
    version at once. ``wait=False`` (the scheduler) yields False at once when another report holds
    it; ``wait=True`` (on-demand reports) waits, telling ``say`` so, and raises TimeoutError after
    ``timeout_s``.
    """
    with open(Path(root) / DRIFT_LOCK, "a") as handle:
        if not _try_lock(handle.fileno()):
            if not wait:
                yield False
                return
            if say is not None:
                say(f"waiting for the drift report of {Path(root).name!r} that is running now "
                    f"(lock {handle.name})")
            deadline = time.monotonic() + timeout_s
            while not _try_lock(handle.fileno()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Another drift report of {Path(root).name!r} held {handle.name} for "
                                       f"more than {timeout_s:.0f}s.")
                time.sleep(0.1)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
