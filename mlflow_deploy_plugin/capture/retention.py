"""Retention: delete whole days of captured traffic once they are older than the deployment keeps.

Kept apart from the writer because it is a policy on the layout, not part of writing: each writer
with ``retention_days`` (``-C capture_retention_days``) calls :func:`prune_capture` on its root at
start and every ten minutes, and it works just as well on a root no writer serves. Only whole
``date=`` partitions before yesterday can go, so today's files are never touched; several workers
pruning one root at once is harmless.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pyarrow.fs as pafs

from mlflow_deploy_plugin.capture.layout import as_utc, list_partitions, partition_path, resolve_root

_log = logging.getLogger(__name__)


def prune_capture(
    root: str,
    deployment: str | None,
    retention_days: int,
    now: datetime | None = None,
    *,
    _fs: tuple[pafs.FileSystem, str] | None = None,
) -> list[str]:
    """Delete ``date=`` partitions of ``root`` whose whole day is older than ``retention_days``.

    A partition for day D is removed when D + 1 day <= now - retention_days, i.e. today and the
    previous ``retention_days`` days are kept. ``deployment`` only labels the log line.
    Returns the removed partitions as ``{root}/date=YYYY-MM-DD``.
    """
    if retention_days < 1:
        raise ValueError(f"retention_days must be >= 1, got {retention_days!r}.")
    now = as_utc(now) if now is not None else datetime.now(UTC)
    cutoff = (now - timedelta(days=retention_days)).date()
    fs, base = _fs if _fs is not None else resolve_root(root)
    removed = []
    for day, path in list_partitions(fs, base):
        if day >= cutoff:
            break
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            continue  # another worker pruned it first
        removed.append(partition_path(root, day))
    if removed:
        _log.info("Capture%s: removed %d partitions older than %d days.",
                  f" for deployment {deployment!r}" if deployment else "", len(removed), retention_days)
    return removed
