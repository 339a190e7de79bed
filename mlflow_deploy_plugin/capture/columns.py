"""A table of Parquet files read one column at a time: how the drift job reads large windows.

A window of 10M captured rows x 25 columns is ~2 GB as a DataFrame (more with text columns as
Python objects); the drift statistics only ever need one column of each side at a time. A
:class:`ParquetColumns` looks enough like a DataFrame for the drift job (``columns``, ``len()``,
``table[name]`` -> Series, ``table[names]``, ``table[bool mask]``) while holding only the files and
a row mask: ``table[name]`` reads that one column (a projected pyarrow dataset scan) and releases it
when the caller drops the Series.

What a column read gives is what the same column of the whole table read at once
(``to_table().to_pandas()``) gives, with one exception: text columns come back as pandas
categoricals (dictionary-encoded by Arrow), not object arrays: counting 10M strings as Python objects
costs seconds per column, counting dictionary codes milliseconds. The drift statistics give the same
figures for both (:func:`mlflow_deploy_plugin.monitoring.drift_stats._value_counts`).

Row order is the scan's (files in the order given, each file's rows in order), the same on every
read: Arrow assembles a dataset scan's batches by (fragment, batch) index, so a mask computed from
one column applies to every other. It is not the time order ``read_capture`` sorts into; nothing
computed from a ParquetColumns may depend on row order.

A random sample of rows (for the Evidently page) is kept on the way: with :meth:`keep_sample`, each
column read leaves its sampled rows behind, so the sample costs no extra read.

Memory: a column of a table restricted to some rows is read in record batches, each cut to its
rows as it arrives (the column of all the files' rows and its selection are never both held), and
what Arrow's allocator freed is handed back to the system once reads of :data:`RELEASE_AFTER_BYTES`
have been freed since the last time (:func:`release_unused_memory`): its allocator keeps freed pages
for its next allocation, which numpy, where the column goes, never makes. At 10M rows that is after
every column (one is 40-80 MB), as the 1 GB bound of the drift job needs; a window of few rows
and many columns does not pay a ``malloc_trim`` per column for a few kB each. With
:meth:`numbers_as_float64`, integer and float64 columns come as float64 (what the statistics
convert them to anyway), each batch converted into one preallocated array as it arrives: the
caller holds one array per column, the read no more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

Transform = Callable[[pd.Series], pd.Series]
# Arrow memory freed by reads before it is handed back: below glibc's largest mmap threshold (32 MB,
# above which a free returns the pages by itself), well below any 10M-row column (40-80 MB).
RELEASE_AFTER_BYTES = 16 * 2**20


def _is_text(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


def _is_number(type_: pa.DataType) -> bool:
    """Integers and float64: read as float64 for the statistics (float32 stays float32, as pandas reads it)."""
    return pa.types.is_integer(type_) or pa.types.is_float64(type_)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS: nothing to call)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_unused_memory() -> None:
    """Hand back to the system the memory the process freed but its allocators keep: Arrow's pool
    (mimalloc/jemalloc keep freed pages for Arrow's next allocation) and glibc's heaps (arrays below
    its mmap threshold, up to 32 MB, are freed into heaps that are not given back on their own).

    Called between the large steps of a job that reads big columns one after the other: without it
    the process keeps the largest size each allocator ever held, on top of what it holds now. It
    costs page faults when the memory is needed again (~30 ms per 100 MB), never a copy.
    """
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def sample_positions(rows: int, size: int, seed: int) -> np.ndarray | None:
    """The sorted row positions of a seeded random sample of ``size`` of ``rows`` rows, or None when
    ``rows <= size`` (all rows). The same draw as the in-memory report's sample."""
    if rows <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))


class ParquetColumns:
    """Parquet files (a pyarrow dataset) read column by column, restricted to the rows of ``mask``.

    Args:
        dataset: The files, with the schema to read them with (e.g. the unified schema of capture
            files written by several model versions).
        names: The visible columns (default: the dataset's, without pandas index columns).
        mask: Which of the dataset's rows (in scan order) belong to the table; None: all.
        transforms: Per column, a function applied to each read (e.g. hashing, as capture does).
    """

    def __init__(self, dataset: ds.Dataset, names: list[str] | None = None, mask: np.ndarray | None = None,
                 transforms: Mapping[str, Transform] | None = None) -> None:
        self._dataset = dataset
        if names is None:
            index = {c for c in (dataset.schema.pandas_metadata or {}).get("index_columns", [])
                     if isinstance(c, str)}
            names = [n for n in dataset.schema.names if n not in index]
        self._names = list(names)
        self._mask = mask
        self._rows = int(mask.sum()) if mask is not None else dataset.count_rows()
        self._transforms = dict(transforms or {})
        self._sample: tuple[int, int, np.ndarray | None] | None = None  # (size, seed, positions)
        self._sampled: dict[str, pd.Series] = {}
        self._numbers_as_float64 = False
        self._unreleased = 0  # bytes of Arrow data read and freed since memory was last handed back
        self.releases = 0  # how often it was (release_unused_memory)

    # ---- what the drift job uses of a DataFrame

    @property
    def columns(self) -> pd.Index:
        """The column names (a pandas Index, as ``DataFrame.columns``)."""
        return pd.Index(self._names, dtype=object)

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, key: Any) -> Any:
        """``table[name]``: that column (a Series); ``table[names]``: a table of those columns;
        ``table[mask]`` (bool array, one per row): a table of those rows."""
        if isinstance(key, str):
            return self.column(key)
        if isinstance(key, np.ndarray) and key.dtype == bool:
            return self.restrict(key)
        return self.select(list(key))

    def column(self, name: str) -> pd.Series:
        """Read one column of the table's rows (text as a categorical), with its transform applied
        (numbers as float64 after :meth:`numbers_as_float64`). The Series is the caller's own: no
        other object holds its values."""
        if name not in self._names:
            raise KeyError(name)
        if self._numbers_as_float64 and name not in self._transforms and _is_number(self._dataset.schema.field(name).type):
            return self._read_float64(name)
        table = self._read(name)
        data = table.column(0)
        if _is_text(data.type):
            table = table.set_column(0, table.field(0).with_type(pa.dictionary(pa.int32(), data.type)),
                                     data.dictionary_encode())
        del data
        # self_destruct: each chunk is freed once copied, so a column is not held twice at its peak.
        series = table.to_pandas(split_blocks=True, self_destruct=True).iloc[:, 0]
        series.name = name  # not rename(): it copies the values
        del table
        self._release_if_due()  # the Arrow buffers just freed: numpy holds the column now
        transform = self._transforms.get(name)
        if transform is not None:
            series = transform(series)
        if self._sample is not None:
            positions = self._sample[2]
            # A copy either way: the caller may reorder the column's values in place (drift_stats).
            kept = series.copy() if positions is None else series.iloc[positions].reset_index(drop=True)
            if isinstance(kept.dtype, pd.CategoricalDtype) and transform is None:
                # Plotted as the text it was: an object column, None where missing, as read whole.
                kept = kept.astype(object).where(kept.notna(), None)
            self._sampled[name] = kept
        return series

    def numbers_as_float64(self) -> None:
        """From now on, read integer and float64 columns as float64, each batch converted into one
        array as it arrives (the kept sample stays as read: integers as integers). For the drift
        statistics, which convert every number to float64 (the same conversion): the caller holds
        one array per column, and the read never holds the column twice (Arrow's and numpy's)."""
        self._numbers_as_float64 = True

    def _read_float64(self, name: str) -> pd.Series:
        """:meth:`column` of a number column, as float64 (missing values NaN), filled batch by batch."""
        values = np.empty(self._rows, dtype=np.float64)
        positions = self._sample[2] if self._sample is not None else None
        kept: list[pa.Array] = []
        filled = nulls = 0
        for array in self._arrays(self._dataset, name):
            stop = filled + len(array)
            if stop > self._rows:
                raise RuntimeError(f"the files changed while being read: more than {self._rows} rows")
            if self._sample is not None:  # the sample as read, before the conversion
                if positions is None:
                    kept.append(array)
                else:
                    lo, hi = np.searchsorted(positions, [filled, stop])
                    kept.append(array.take(pa.array(positions[lo:hi] - filled)))
            nulls += array.null_count
            if not pa.types.is_float64(array.type):
                array = array.cast(pa.float64(), safe=False)  # as numpy's astype: nearest float
            values[filled:stop] = array.to_numpy(zero_copy_only=False)  # nulls come as NaN
            filled = stop
        if filled != self._rows:
            raise RuntimeError(f"the files changed while being read: {filled} rows, expected {self._rows}")
        self._release_if_due()
        if self._sample is not None:
            field = self._dataset.schema.field(name)
            sample = pa.chunked_array(kept, type=field.type).to_pandas()
            if nulls and pd.api.types.is_integer_dtype(sample.dtype):
                sample = sample.astype(np.float64)  # as the whole column reads: with NaN, as floats
            sample.name = name
            self._sampled[name] = sample
        return pd.Series(values, name=name, copy=False)

    def _release_if_due(self) -> None:
        """Hand memory back to the system once the reads since the last time freed enough Arrow data
        (:data:`RELEASE_AFTER_BYTES`), not after every small column: ``malloc_trim`` walks the whole
        heap each time."""
        if self._unreleased >= RELEASE_AFTER_BYTES:
            release_unused_memory()
            self._unreleased = 0
            self.releases += 1

    def _read(self, name: str) -> pa.Table:
        """Column ``name`` of the table's rows. With a row mask, the scan's record batches are cut
        to their rows as they arrive (scan order is fixed: file by file, batch by batch), so the
        column of every row of the files is never held whole."""
        dataset = self._column_dataset(name)
        try:
            if self._mask is None:
                return self._scanned(dataset.to_table(columns=[name]))
            return self._read_masked(dataset, name)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            if dataset is self._dataset:
                raise
            # Text read from Parquet's dictionary pages failed (e.g. a file holds numbers in this
            # column): read it as the schema says.
            if self._mask is None:
                return self._scanned(self._dataset.to_table(columns=[name]))
            return self._read_masked(self._dataset, name)

    def _scanned(self, table: pa.Table) -> pa.Table:
        self._unreleased += table.nbytes  # freed once converted
        return table

    def _read_masked(self, dataset: ds.Dataset, name: str) -> pa.Table:
        arrays = list(self._arrays(dataset, name))
        if not arrays:
            return dataset.schema.empty_table().select([name])
        return pa.Table.from_arrays([pa.chunked_array(arrays)], names=[name])

    def _arrays(self, dataset: ds.Dataset, name: str) -> Iterator[pa.Array]:
        """Column ``name`` batch by batch (scan order), each cut to the table's rows."""
        mask = self._mask
        offset = 0
        for batch in dataset.to_batches(columns=[name]):
            self._unreleased += batch.nbytes  # freed once cut and converted, whatever rows it keeps
            stop = offset + batch.num_rows
            if mask is None:
                yield batch.column(0)
            elif stop <= len(mask):
                yield batch.column(0).filter(pa.array(mask[offset:stop]))
            offset = stop
        if mask is not None and offset != len(mask):
            raise RuntimeError(f"the files changed while being read: {offset} rows, expected {len(mask)}")

    def _column_dataset(self, name: str) -> ds.Dataset:
        """The dataset to scan for column ``name``: text straight from Parquet's dictionary pages
        (no string is materialised: ~6x faster than reading text and encoding it again)."""
        field = self._dataset.schema.field(name)
        partitioning = getattr(self._dataset, "partitioning", None)
        in_files = partitioning is None or name not in partitioning.schema.names  # hive columns are not
        if _is_text(field.type) and in_files and isinstance(self._dataset, ds.FileSystemDataset):
            schema = self._dataset.schema
            schema = schema.set(schema.get_field_index(name), field.with_type(pa.dictionary(pa.int32(), field.type)))
            options = ds.ParquetReadOptions(dictionary_columns=[name])
            return ds.dataset(self._dataset.files, schema=schema, filesystem=self._dataset.filesystem,
                              format=ds.ParquetFileFormat(read_options=options))
        return self._dataset

    def select(self, names: list[str]) -> ParquetColumns:
        """The same rows, only columns ``names`` (which must exist)."""
        unknown = [n for n in names if n not in self._names]
        if unknown:
            raise KeyError(unknown)
        return self._copy(names=list(names), mask=self._mask)

    def restrict(self, keep: np.ndarray) -> ParquetColumns:
        """The rows of this table where ``keep`` (one bool per row of this table) is true."""
        if len(keep) != self._rows:
            raise ValueError(f"mask of {len(keep)} rows for a table of {self._rows}")
        if self._mask is None:
            mask = np.asarray(keep, dtype=bool).copy()
        else:
            mask = self._mask.copy()
            mask[mask] = keep
        return self._copy(names=self._names, mask=mask)

    def with_transforms(self, transforms: Mapping[str, Transform], drop: Sequence[str] = ()) -> ParquetColumns:
        """The same table without columns ``drop`` and with ``transforms`` applied to their columns."""
        table = self._copy(names=[n for n in self._names if n not in set(drop)], mask=self._mask)
        table._transforms.update(transforms)
        return table

    def _copy(self, names: list[str], mask: np.ndarray | None) -> ParquetColumns:
        table = ParquetColumns.__new__(ParquetColumns)
        table._dataset, table._names, table._mask = self._dataset, names, mask
        table._rows = int(mask.sum()) if mask is not None else self._rows
        table._transforms = dict(self._transforms)
        table._sample, table._sampled = None, {}
        table._numbers_as_float64 = self._numbers_as_float64
        table._unreleased, table.releases = 0, 0
        return table

    # ---- the sample for the Evidently page

    def keep_sample(self, size: int, seed: int) -> None:
        """From now on, keep each column read's rows of a seeded random sample of ``size`` rows
        (:func:`sample_positions`): :meth:`sample` then needs no further read."""
        self._sample = (size, seed, sample_positions(self._rows, size, seed))
        self._sampled = {}

    def sample(self, names: list[str], size: int, seed: int) -> tuple[pd.DataFrame, bool]:
        """``size`` random rows of columns ``names`` (all rows if fewer) and whether it is a sample;
        columns read since :meth:`keep_sample` with the same size and seed are not read again."""
        if self._sample is None or self._sample[:2] != (size, seed):
            self.keep_sample(size, seed)
        assert self._sample is not None
        for name in names:
            if name not in self._sampled:
                self.column(name)
        frame = pd.DataFrame({name: self._sampled[name] for name in names})
        if not names:
            frame = pd.DataFrame(index=pd.RangeIndex(min(size, self._rows)))
        return frame, self._sample[2] is not None

    # ---- rows in batches (e.g. the model's predictions on the reference)

    def iter_frames(self, batch_rows: int = 100_000) -> Iterator[pd.DataFrame]:
        """The table's rows as DataFrames of up to ``batch_rows`` rows, in scan order (all columns,
        transforms not applied: for the model, which sees what it was given)."""
        offset = 0
        for batch in self._dataset.to_batches(columns=self._names, batch_size=batch_rows):
            frame = batch.to_pandas()
            if self._mask is not None:
                keep = self._mask[offset:offset + len(frame)]
                offset += len(frame)
                frame = frame[keep].reset_index(drop=True)
            if len(frame):
                yield frame


def open_parquet(path: str, filesystem: Any = None) -> ParquetColumns:
    """A Parquet file, or a folder of Parquet files, as a :class:`ParquetColumns` (nothing read yet
    but the footers)."""
    # Hive partitions (``key=value`` folders) as columns, as ``pd.read_parquet`` of a folder reads them.
    return ParquetColumns(ds.dataset(path, format="parquet", filesystem=filesystem, partitioning="hive"))
