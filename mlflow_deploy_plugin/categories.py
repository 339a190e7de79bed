"""One spelling of a category value, wherever a category is shown or compared as text.

The same integer category reaches the code as ``6`` (an int64 column), ``6.0`` (a float64 one: an
integer column with a missing value, or a column the drift job reads streamed as float64) or
``"6"`` (text from JSON or CSV). Drift listed it as ``'6.0'`` while data quality listed ``'6'``,
and a reference of ints compared as text with captured floats made every value new. Every place
that turns a category into text goes through :func:`category_text`: drift's
``new_category_counts``, data quality's unseen categories, and the classes the quality job joins
(:func:`.quality.labels.canonical`).

Standard library only (numpy's scalars register with :mod:`numbers`): serving imports the labels
module, whose import stays light.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def category_text(value: Any) -> str:
    """``value`` as category text: an integral number as the integer it is (``6``, ``6.0`` and
    ``numpy.int64(6)`` are all ``"6"``), another float as Python writes it (``6.5``, ``inf``), a
    bool as ``True``/``False``, bytes decoded as UTF-8, anything else as ``str`` gives it."""
    if isinstance(value, bool):  # an Integral to Python, but no number here (numpy's bool is not one)
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        return str(int(number)) if math.isfinite(number) and number.is_integer() else repr(number)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
