"""Stacking many small request frames, which both batching and capture do on every request."""

from __future__ import annotations

import numpy as np
import pandas as pd


def stack_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate frames row-wise; same-shaped float frames via numpy (~20x faster than pd.concat).

    ``pd.concat`` of a few dozen one-row frames costs more than predicting them, and holds the
    GIL while it does: on the request path that is latency for everyone.
    """
    first = frames[0]
    if len(frames) == 1:
        return first
    if all(dtype == np.float64 for dtype in first.dtypes) and all(
            f.columns.equals(first.columns) and f.dtypes.equals(first.dtypes) for f in frames):
        return pd.DataFrame(np.vstack([f.to_numpy() for f in frames]), columns=first.columns)
    return pd.concat(frames, ignore_index=True)
