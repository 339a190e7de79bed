"""Where captured traffic lives and how it is laid out: the contract between serving and the drift job.

Kept apart from the writer and the reader because both sides (and retention) must agree on it, and
because it is the part that must stay stable: files written by one version are read by the next.

Layout (shared with the drift job, keep it stable)::

    {root}/date=YYYY-MM-DD/part-{utc time}-{pid}-{seq}.parquet

``root`` is a deployment's own capture folder, or ``capture_uri/<name>`` (:func:`capture_root`);
it may be a local folder or a pyarrow filesystem URI. Partitions are UTC days. Several worker
processes may write to the same root: file names carry the pid and a per-process sequence number.

One row per input row. Meta columns first (``_request_id``, ``_timestamp``, ``_deployment``,
``_model_version``, ``_status``, ``_latency_ms``, ``_row``, ``_role``, ``_model_name``), then the input columns
under their own names, then the predictions (``_prediction`` or ``_prediction_<col>``).

``_role`` is ``primary`` for the answer the client got and ``shadow`` for a shadow version's answer to
the same request (same ``_request_id``; see ``serving/shadow.py``). Files written before it existed
have no ``_role``: their rows read as primary. ``_model_name`` is the registered model that answered (a
shadow may be another model than the primary; ``_model_version`` alone does not say which); null in
files written before it existed and for requests recorded without one.
"""

from __future__ import annotations

import itertools
import os
import re
from datetime import UTC, date, datetime

import pyarrow as pa
import pyarrow.fs as pafs

META_COLUMNS: tuple[str, ...] = (
    "_request_id", "_timestamp", "_deployment", "_model_version", "_status", "_latency_ms", "_row", "_role",
    "_model_name",
)
META_SCHEMA = pa.schema([
    ("_request_id", pa.string()),
    ("_timestamp", pa.timestamp("us", tz="UTC")),
    ("_deployment", pa.string()),
    ("_model_version", pa.string()),
    ("_status", pa.int16()),
    ("_latency_ms", pa.float32()),
    ("_row", pa.int32()),
    ("_role", pa.string()),
    ("_model_name", pa.string()),
])
ROLE_COLUMN = "_role"
PREDICTION_PREFIX = "_prediction"

_PARTITION_PREFIX = "date="
_PARTITION_RE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
# Shared by every writer in the process so two writers on one root cannot pick the same file name.
_FILE_SEQ = itertools.count()


def capture_root(deployment: str, capture_uri: str | None, default_dir: str) -> str:
    """Where a deployment's captured traffic lives: its own folder, or ``capture_uri/<name>``."""
    if capture_uri:
        return f"{capture_uri.rstrip('/')}/{deployment}"
    return default_dir


def resolve_root(root: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it for a local folder or a pyarrow filesystem URI."""
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


def join_path(root: str, *parts: str) -> str:
    """``root/part/...`` with ``/`` separators (local paths and object-store keys alike)."""
    return "/".join([root.rstrip("/"), *parts])


def partition_path(root: str, day: date) -> str:
    """The ``{root}/date=YYYY-MM-DD`` folder of one UTC day."""
    return join_path(root, f"{_PARTITION_PREFIX}{day.isoformat()}")


def new_part_name() -> str:
    """A file name no other writer (in this process or another) picks: ``part-{utc time}-{pid}-{seq}``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"part-{stamp}-{os.getpid()}-{next(_FILE_SEQ):06d}.parquet"


def list_partitions(fs: pafs.FileSystem, base: str) -> list[tuple[date, str]]:
    """The ``date=`` folders under ``base`` with their dates; none if ``base`` does not exist."""
    selector = pafs.FileSelector(base, allow_not_found=True, recursive=False)
    found = []
    for info in fs.get_file_info(selector):
        match = _PARTITION_RE.match(info.base_name)
        if info.type != pafs.FileType.Directory or match is None:
            continue
        try:
            found.append((date.fromisoformat(match.group(1)), info.path))
        except ValueError:
            continue
    found.sort()
    return found


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC, the time of partitions and ``_timestamp``; naive datetimes are taken as UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
