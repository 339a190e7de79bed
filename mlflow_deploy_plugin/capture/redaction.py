"""Keep named input columns out of captured data, or capture a keyed hash of them instead.

``-C capture_exclude=ssn,email`` drops those columns before anything is written; ``-C
capture_hash=customer_id,zip`` writes ``HMAC-SHA256(key, str(value))`` cut to 16 hex characters.
The key is a secret in the deployment's folder (``capture.key``, 0600), so a hash cannot be
reversed by hashing guesses without it, while equal values still hash equal: the distribution of a
hashed column is kept, and drift on it works as on any categorical column once the reference data
is hashed with the same key (the drift job does that with :meth:`CaptureRedaction.apply`).
Missing values stay missing. Hashing a numeric column turns it into a categorical one.

Applied on the capture writer's thread (never on the request path), to whole stacked groups.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pyarrow.dataset: not imported on the serving side for a type
    from mlflow_deploy_plugin.capture.columns import ParquetColumns

HASH_CHARS = 16
# The column capture stores non-tabular inputs in (as text): it could hold anything, so it is
# dropped whenever columns are to be kept out.
UNSTRUCTURED_COLUMN = "_input"


def keyed_hash(values: pd.Series, key: bytes) -> pd.Series:
    """Each value's keyed hash (16 hex characters) as an object Series; missing values stay missing."""
    out = np.empty(len(values), dtype=object)
    missing = values.isna().to_numpy()
    for index, (value, absent) in enumerate(zip(values.tolist(), missing, strict=True)):
        out[index] = None if absent else hmac.new(key, str(value).encode(), hashlib.sha256).hexdigest()[:HASH_CHARS]
    return pd.Series(out, index=values.index, name=values.name, dtype=object)


class CaptureRedaction:
    """What to leave out of (``exclude``) or hash in (``hashed``) captured input columns."""

    def __init__(self, exclude: Iterable[str] = (), hashed: Iterable[str] = (), key: str | None = None) -> None:
        self.exclude = frozenset(exclude)
        self.hashed = frozenset(hashed)
        if self.hashed and not key:
            raise ValueError("capture_hash needs a key")
        self._key = (key or "").encode()

    def __bool__(self) -> bool:
        return bool(self.exclude or self.hashed)

    def apply_to_columns(self, table: ParquetColumns) -> ParquetColumns:
        """:meth:`apply` for a table read one column at a time: the same columns left out, the same
        hash applied to each read of a hashed column."""
        if not self:
            return table
        names = [str(c) for c in table.columns]
        drop = [name for name in names if name in self.exclude or name == UNSTRUCTURED_COLUMN]
        hashed = {name: partial(keyed_hash, key=self._key) for name in names
                  if name in self.hashed and name not in drop}
        return table.with_transforms(hashed, drop=drop)

    def apply(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` without the excluded columns and with the hashed ones hashed (a new frame)."""
        if not self:
            return frame
        columns = [str(c) for c in frame.columns]
        drop = [c for c, name in zip(frame.columns, columns, strict=True)
                if name in self.exclude or name == UNSTRUCTURED_COLUMN]
        if drop:
            frame = frame.drop(columns=drop)
        hashed = [c for c in frame.columns if str(c) in self.hashed]
        if hashed:
            frame = frame.assign(**{str(c): keyed_hash(frame[c], self._key) for c in hashed})
        return frame
