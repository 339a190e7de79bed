"""The pandas-free part of building capture tables: request attributes, meta columns, column names.

The converter process (:mod:`.converter`) builds the tables of compact spool records (float frames,
numeric predictions: nearly all traffic) from these, Arrow and numpy alone, so it never imports
pandas for them (~40 MiB of resident memory and ~0.25 s of CPU at each start, see
``benchmarks/capture_cost.py``). :mod:`.arrow` builds the tables of everything else on top of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from mlflow_deploy_plugin.capture.layout import META_COLUMNS, PREDICTION_PREFIX

_EPOCH = date(1970, 1, 1)

# What capture reads of an answered request besides ``inputs`` and ``predictions``: the spool
# (:mod:`.spool`) carries exactly these attributes to the converter process (None for one a
# request lacks). A pickled record takes a new one as one more name here (and in
# :func:`meta_arrays`); compact and batch records (:mod:`.batch`) hold these seven in their
# formats, so a new one is a change of those too.
REQUEST_ATTRS: tuple[str, ...] = ("request_id", "timestamp", "model_version", "status", "latency_ms", "role",
                                   "model_name")


@dataclass(slots=True)
class RequestMeta:
    """The :data:`REQUEST_ATTRS` of a table's requests, one list per attribute, request by request.

    Built from request objects (:meth:`add`), or directly by a decoder that has the values at hand
    (:mod:`.spool`'s compact records), so no object per request is needed.
    """

    request_id: list[Any] = field(default_factory=list)
    timestamp: list[Any] = field(default_factory=list)
    model_version: list[Any] = field(default_factory=list)
    status: list[Any] = field(default_factory=list)
    latency_ms: list[Any] = field(default_factory=list)
    role: list[Any] = field(default_factory=list)
    model_name: list[Any] = field(default_factory=list)

    def add(self, request: Any) -> None:
        """Append one request's attributes (None for one it lacks)."""
        for name in REQUEST_ATTRS:
            getattr(self, name).append(getattr(request, name, None))

    def __len__(self) -> int:
        return len(self.request_id)


def day_of(timestamp: float) -> date:
    """The UTC day of an epoch timestamp (the ``date=`` partition its rows go to)."""
    return _EPOCH + timedelta(days=int(float(timestamp) // 86400))


def numeric_array(values: np.ndarray) -> pa.Array:
    """A 1-D numeric or bool numpy array as Arrow, NaN as null: what ``pa.array(values,
    from_pandas=True)`` gives, built from the array's buffers because ``pa.array`` imports pandas
    (to look for categoricals) the first time it sees a numpy array or a list."""
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    values = np.ascontiguousarray(values)
    n = len(values)
    if values.dtype.kind == "b":
        return pa.Array.from_buffers(pa.bool_(), n, [None, pa.py_buffer(np.packbits(values, bitorder="little"))])
    validity, nulls = None, 0
    if values.dtype.kind == "f":
        present = ~np.isnan(values)
        nulls = n - int(np.count_nonzero(present))
        if nulls:
            validity = pa.py_buffer(np.packbits(present, bitorder="little"))
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), n, [validity, pa.py_buffer(values)],
                                 null_count=nulls)


def string_array(values: Sequence[str | None]) -> pa.Array:
    """Texts (None: null) as an Arrow string array, from its buffers (see :func:`numeric_array`)."""
    encoded = [b"" if value is None else value.encode() for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    present = np.fromiter((value is not None for value in values), dtype=bool, count=len(encoded))
    nulls = len(encoded) - int(np.count_nonzero(present))
    validity = pa.py_buffer(np.packbits(present, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(pa.string(), len(encoded), [validity, pa.py_buffer(offsets),
                                                             pa.py_buffer(b"".join(encoded))], null_count=nulls)


def meta_arrays(meta: RequestMeta, counts: Sequence[int], deployment: str) -> list[pa.Array]:
    """The :data:`~.layout.META_COLUMNS` of requests with ``counts`` rows each, in that order: a
    request's values repeated on each of its rows (converted once per request, repeated by Arrow)."""
    counts_array = np.asarray(counts, dtype=np.int64)
    total = int(counts_array.sum())
    micros = np.fromiter((round(float(t) * 1e6) for t in meta.timestamp), dtype=np.int64, count=len(meta))
    starts = np.repeat(np.cumsum(counts_array) - counts_array, counts_array)
    of_row = None if total == len(meta) else numeric_array(np.repeat(np.arange(len(meta), dtype=np.int64),
                                                                     counts_array))

    def text(values: list[Any]) -> pa.Array:
        array = string_array(values)
        return array if of_row is None else array.take(of_row)

    return [
        text([str(x) for x in meta.request_id]),
        numeric_array(np.repeat(micros, counts_array)).cast(pa.timestamp("us", tz="UTC")),
        string_array([deployment]).take(numeric_array(np.zeros(total, dtype=np.int64))),
        text([str(x) for x in meta.model_version]),
        numeric_array(np.repeat(np.array([int(x) for x in meta.status], dtype=np.int16), counts_array)),
        numeric_array(np.repeat(np.array([float(x) for x in meta.latency_ms], dtype=np.float32), counts_array)),
        numeric_array((np.arange(total, dtype=np.int64) - starts).astype(np.int32)),
        # primary unless the answer says otherwise (serving/shadow.py's say shadow)
        text([str(x or "primary") for x in meta.role]),
        # null when the answer does not say (requests recorded by other callers, older spools)
        text([str(x) if x else None for x in meta.model_name]),
    ]


def input_names(columns: Sequence[Any]) -> list[str]:
    """Input column labels as unique strings that cannot clash with the meta or prediction columns."""
    fixed: list[str] = []
    seen: set[str] = set()
    for label in columns:
        name = str(label)
        if name in META_COLUMNS or name.startswith(PREDICTION_PREFIX):
            name = f"_input{name}"
        base, k = name, 1
        while name in seen:
            name = f"{base}.{k}"
            k += 1
        seen.add(name)
        fixed.append(name)
    return fixed


def prediction_arrays(predictions: np.ndarray) -> dict[str, np.ndarray]:
    """Numeric predictions of one row each (1-D) or several columns (2-D) as named 1-D columns
    (what :func:`.arrow.prediction_columns` makes of such an array)."""
    if predictions.ndim == 1:
        return {PREDICTION_PREFIX: predictions}
    return {f"{PREDICTION_PREFIX}_{i}": predictions[:, i] for i in range(predictions.shape[1])}


def merge_tables(tables: list[tuple[pa.Table, int]]) -> list[tuple[pa.Table, int]]:
    """Tables of one day as one table (one file), or unchanged when their columns cannot unify."""
    if len(tables) == 1:
        return tables
    try:
        merged = pa.concat_tables([t for t, _ in tables], promote_options="permissive")
        return [(merged, sum(n for _, n in tables))]
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Same column name, incompatible types (e.g. two model versions): one file each.
        return tables
