"""Refuse decode bombs cheaply: how big a body decodes to, found before it is decoded.

A body's bytes say little about what it decodes to: a 45 kB Parquet file can hold 10 million rows
of zeros, a 32 MB JSON body 10 million one-element arrays. ``max_body_mb`` bounds the bytes; the
limits here bound the result (``-C max_rows``, ``-C max_cells``) and are checked *before* the
expensive step of each format:

- Parquet: the footer (metadata) names the rows and columns; nothing else is read if they exceed.
- JSON: a count of structural bytes (``,``, ``[``, ``{``; strings stripped only when the quick count
  is over) bounds the values ``json.loads`` would build; the rows are counted on the decoded
  structure, before pandas builds a frame.
- CSV: the header gives the columns, and pandas reads at most one row more than allowed.

Every refusal is a 413 that names the limit and how to raise it. JSON numbers that do not fit a
64-bit float (an integer literal of 400 digits, ``1e400``) are a 400 naming their column.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlflow_deploy_plugin.serving.errors import ServingError

DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_CELLS = 10_000_000
LIMIT_ERROR = "REQUEST_LIMIT_EXCEEDED"

# JSON strings, unrolled so the regex engine does not backtrack per character.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Literals that may not fit a float64: 200+ digits in a row, or an exponent of three digits (what
# rb"\d{200}|[eE]\+?\d{3}" finds): with an exponent of two digits at most, a literal overflows only
# from 210 digits before its point on ("9" * 250 + "e99" is inf), so 200 leaves a margin. Bodies without any (nearly all) are decoded by json's C fast
# path; the others with the checking hooks below. That regex on the body costs more than decoding
# it (~1 ms for 100 rows of 20 floats: re tries a 300-digit match at every digit), so the body is
# first mapped byte for byte to its shape (digit -> "0", e/E -> "e", "+" kept, anything else -> " ",
# ~40 us), in which both patterns start with a literal that re and `in` skip to at C speed.
_NUMBER_SHAPE = bytes.maketrans(bytes(range(256)), b"".join(
    b"0" if byte in b"0123456789" else b"e" if byte in b"eE" else b"+" if byte == ord("+") else b" "
    for byte in range(256)))
_LONG_DIGITS = b"0" * 200
# The shortest integer literal orjson reads as a float, not exactly as json does: 19 digits
# (-9223372036854775809, below -2**63; above 2**64 - 1 it takes 20).
_WIDE_INTEGER = b"0" * 19
_BIG_EXPONENT = re.compile(rb"e\+?000")
_FORMAT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


@dataclass(frozen=True)
class DecodeLimits:
    """How much one request may decode to."""

    max_rows: int = DEFAULT_MAX_ROWS
    max_cells: int = DEFAULT_MAX_CELLS

    def check(self, rows: int, columns: int, what: str) -> None:
        """Raise a 413 if ``rows`` rows of ``columns`` columns are more than allowed."""
        if rows > self.max_rows:
            raise ServingError(
                413, LIMIT_ERROR,
                f"{what} has {rows:,} rows, more than max_rows={self.max_rows}. Send fewer rows per "
                "request, or raise the limit: mlflow deployments update -t lifecycle --name <name> "
                "-C max_rows=<n>.")
        cells = rows * max(columns, 1)
        if cells > self.max_cells:
            raise ServingError(
                413, LIMIT_ERROR,
                f"{what} has {cells:,} cells ({rows:,} rows x {columns:,} columns), more than "
                f"max_cells={self.max_cells}. Send fewer rows or columns per request, or raise the "
                "limit: mlflow deployments update -t lifecycle --name <name> -C max_cells=<n>.")

    @property
    def max_values(self) -> int:
        """Most JSON values (of any kind) a body may hold before it is decoded.

        A table within the limits holds its cells, one array or object per row, its column names and
        a few wrappers: at most twice ``max_cells`` plus ``max_rows``. More is refused unread.
        """
        return 2 * self.max_cells + self.max_rows + 64

    def check_values(self, values: int, what: str) -> None:
        """Raise a 413 if a body holds more values than any body within the limits would."""
        if values > self.max_values:
            raise ServingError(
                413, LIMIT_ERROR,
                f"{what} holds more than {self.max_values:,} values (numbers, strings, arrays and objects "
                f"all count), more than max_cells={self.max_cells} and max_rows={self.max_rows} allow. "
                "Send less per request, or raise the limit: mlflow deployments update -t lifecycle "
                "--name <name> -C max_cells=<n>.")


# ---- JSON ---------------------------------------------------------------------------------------


def json_values_bound(body: bytes, limit: int) -> int:
    """An upper bound of the values ``json.loads(body)`` builds, exact enough to compare to ``limit``.

    Every value but the first is preceded by a comma, and a container costs more than a comma.
    Commas and brackets inside strings only inflate the quick count; when it is over ``limit``
    they are stripped and the count taken again.
    """

    def count(text: bytes) -> int:
        return text.count(b",") + 1 + text.count(b"[") + text.count(b"{")

    if len(body) + 1 <= limit:
        # Each byte is at most one comma or bracket, so no count can exceed this: nothing to count
        # (three passes over the body, ~50 us for 100 rows of 20 floats, paid by every request).
        return len(body) + 1
    quick = count(body)
    if quick <= limit:
        return quick
    return count(_JSON_STRING.sub(b'""', body))


class _OutOfRange(str):
    """A number literal that does not fit a 64-bit float, kept as its text until reported."""


def _parse_int(text: str) -> Any:
    if len(text) < 300:
        return int(text)
    # A finite float has at most 309 digits, well under Python's int-from-str limit (4300).
    return int(text) if math.isfinite(float(text)) else _OutOfRange(text)


def _parse_float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _OutOfRange(text)


def orjson_is_json(body: bytes) -> bool:
    """Whether what orjson decoded of ``body`` is what ``json.loads`` gives: orjson reads integer
    literals beyond 64 bits as floats (json keeps them exact), and a body without 19 digits in a
    row has none. What else the two differ on (NaN, Infinity, a BOM, numbers a float64 cannot hold,
    lone surrogates) orjson refuses. Strings of digits only cost a second decode."""
    return _WIDE_INTEGER not in body.translate(_NUMBER_SHAPE)


def suspect_numbers(body: bytes) -> bool:
    """Whether ``body`` may hold a number literal too big for a float64: 200 digits in a row, or an
    exponent of three digits (``e308``, ``E+400``); strings that look so only cost the slow path."""
    shape = body.translate(_NUMBER_SHAPE)
    return _LONG_DIGITS in shape or _BIG_EXPONENT.search(shape) is not None


def decode_json(body: bytes) -> Any:
    """``json.loads(body)``, raising a 400 naming the column of a number that overflows a float64.

    Raises ValueError/UnicodeDecodeError/RecursionError like ``json.loads`` for invalid JSON.
    """
    if not suspect_numbers(body):
        return json.loads(body)
    decoded = json.loads(body, parse_int=_parse_int, parse_float=_parse_float)
    found = _find_out_of_range(decoded)
    if found is not None:
        path, literal = found
        snippet = literal if len(literal) <= 24 else f"{literal[:12]}...{literal[-6:]} ({len(literal)} characters)"
        raise ServingError(400, "BAD_REQUEST",
                           f"Number out of range in {_column_of(decoded, path)}: {snippet} does not fit a "
                           "64-bit float (largest about 1.8e308).")
    return decoded


def _walk(value: Any) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, leaf) of every scalar, depth first, without recursion."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            stack.extend(((*path, key), child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(((*path, index), child) for index, child in reversed(list(enumerate(item))))
        else:
            yield path, item


def _find_out_of_range(decoded: Any) -> tuple[tuple[Any, ...], str] | None:
    for path, leaf in _walk(decoded):
        if isinstance(leaf, _OutOfRange):
            return path, str(leaf)
    return None


def _column_of(decoded: Any, path: tuple[Any, ...]) -> str:
    """Where a value sits, in the words of the request: its column if it has one."""
    if len(path) >= 4 and path[0] == "dataframe_split" and path[1] == "data":
        columns = decoded["dataframe_split"].get("columns")
        if isinstance(columns, list) and isinstance(path[3], int) and path[3] < len(columns):
            return f"column {str(columns[path[3]])[:64]!r}"
    if path and path[0] == "params" and len(path) > 1:
        return f"param {str(path[1])[:64]!r}"
    for part in path[1:]:
        if isinstance(part, str):
            return f"column {part[:64]!r}"
    return "the input"


def json_shape(decoded: Any) -> tuple[int, int]:
    """(rows, columns) a decoded scoring-protocol body asks to predict; (0, 0) if it is no such body."""
    if not isinstance(decoded, dict):
        return 0, 0
    for key in _FORMAT_KEYS:
        if key not in decoded:
            continue
        payload = decoded[key]
        if key == "dataframe_split":
            if not isinstance(payload, dict):
                return 0, 0
            data, columns = payload.get("data"), payload.get("columns")
            rows = len(data) if isinstance(data, list) else 1
            if isinstance(columns, list):
                return rows, len(columns)
            # pandas pads ragged rows to the longest one: the widest row sets the width.
            widths = [len(row) for row in data if isinstance(row, list)] if isinstance(data, list) else []
            return rows, max(widths, default=1)
        if isinstance(payload, list):
            # Records: pandas builds the union of every record's keys, so a width read off the
            # first record would let disjoint keys through. The values are already capped, so this
            # walk is bounded.
            if payload and all(isinstance(record, dict) for record in payload):
                keys: set[Any] = set()
                for record in payload:
                    keys.update(record)
                return len(payload), len(keys)
            widths = [len(row) for row in payload if isinstance(row, list)]
            return len(payload), max(widths, default=1)
        if isinstance(payload, dict):  # columnar: {"col": [values], ...}
            lengths = [len(v) if isinstance(v, list) else 1 for v in payload.values()]
            return max(lengths, default=0), len(payload)
        return 1, 1
    return 0, 0


# ---- CSV ----------------------------------------------------------------------------------------


def csv_columns_bound(text: str) -> int:
    """An upper bound of a CSV's columns: the fields of its header line."""
    end = text.find("\n")
    header = text if end < 0 else text[:end]
    return header.count(",") + 1


def csv_rows_cap(limits: DecodeLimits, columns: int) -> int:
    """How many data rows may be read before the limits are known to be exceeded."""
    return min(limits.max_rows, limits.max_cells // max(columns, 1))


# ---- Parquet ------------------------------------------------------------------------------------


def parquet_shape(source: Any) -> tuple[int, int]:
    """(rows, leaf columns) from a Parquet file's footer, reading no data pages."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(source).metadata
    return metadata.num_rows, metadata.num_columns


# ---- any decoded input --------------------------------------------------------------------------


def decoded_shape(data: Any) -> tuple[int, int]:
    """(rows, columns) of what a parser returned: a DataFrame, arrays, or a dict of arrays."""
    if isinstance(data, pd.DataFrame):
        return len(data), data.shape[1]
    if isinstance(data, pd.Series):
        return len(data), 1
    if isinstance(data, np.ndarray):
        rows = data.shape[0] if data.ndim else 1
        return rows, (data.size // rows) if rows else 0
    if isinstance(data, dict):
        rows = cells = 0
        for value in data.values():
            value_rows, value_columns = decoded_shape(value)
            rows = max(rows, value_rows)
            cells += value_rows * max(value_columns, 1)
        return rows, (cells // rows) if rows else len(data)
    if isinstance(data, list):
        return len(data), 1
    return 1, 1
