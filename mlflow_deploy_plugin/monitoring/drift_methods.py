"""Which drift test runs on which column, with what threshold: method specs and their defaults.

Kept apart from the statistics (:mod:`.drift_stats`) because it is configuration, not computation:
what users write (``-C drift_methods=...``, a methods file, :class:`.report_job.DriftSettings`) is
parsed and validated here, and the choice of test for each column is made here; the statistics
module only computes. It needs no numpy, pandas or scipy.

Methods (``method`` names are also the names used in ``-C drift_methods=...``):

=================  ===========  ==========  ============================================  ================
name               column kind  score       drifted when                                  default threshold
=================  ===========  ==========  ============================================  ================
``ks``             numeric      p-value     two-sample Kolmogorov-Smirnov p < threshold   ``alpha`` (0.05)
``chi2``           any          p-value     two-sample chi-square test of homogeneity     ``alpha`` (0.05)
                                            (contingency table reference vs current)
                                            p < threshold
``psi``            any          distance    population stability index >= threshold       0.2
``wasserstein``    numeric      distance    Wasserstein-1 / reference std >= threshold    0.1
``jensenshannon``  any          distance    Jensen-Shannon distance (natural log)         0.1
                                            >= threshold
=================  ===========  ==========  ============================================  ================

Defaults: ``ks`` for numeric and ``chi2`` for categorical columns. Both are proper two-sample tests,
so under no drift a column is flagged with probability ~``alpha`` whatever the two sample sizes
(KS on heavily tied data is conservative: below ``alpha``). On large windows they detect even tiny,
practically irrelevant shifts; pick an effect-size method (``psi``, ``wasserstein``,
``jensenshannon``) per column when "how much" matters more than "whether".

A column's kind is decided on the reference (:func:`.drift_stats.column_kind`); a method chosen for
a column overrides it where the values allow: choosing ``chi2`` for a numeric column treats its
values as categories; ``ks``/``wasserstein`` need numeric values.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ColumnKind = Literal["numeric", "categorical"]
ScoreType = Literal["p_value", "distance"]


@dataclass(frozen=True)
class _MethodInfo:
    kinds: tuple[ColumnKind, ...]
    score_type: ScoreType
    default_threshold: float | None  # None: use ``alpha``
    description: str


METHODS: dict[str, _MethodInfo] = {
    "ks": _MethodInfo(("numeric",), "p_value", None, "two-sample Kolmogorov-Smirnov test (p-value)"),
    "chi2": _MethodInfo(("numeric", "categorical"), "p_value", None,
                        "two-sample chi-square test of homogeneity (p-value)"),
    "psi": _MethodInfo(("numeric", "categorical"), "distance", 0.2, "population stability index"),
    "wasserstein": _MethodInfo(("numeric",), "distance", 0.1,
                               "Wasserstein-1 distance normed by the reference std"),
    "jensenshannon": _MethodInfo(("numeric", "categorical"), "distance", 0.1,
                                 "Jensen-Shannon distance (natural log)"),
}
_ALIASES = {"js": "jensenshannon", "wasserstein_norm": "wasserstein", "chi2_contingency": "chi2",
            "chisquare_homogeneity": "chi2"}


def _allowed() -> str:
    return ", ".join(METHODS)


@dataclass(frozen=True)
class ColumnMethod:
    """The drift method of one column and its threshold (None: the method's default)."""

    method: str
    threshold: float | None = None

    def __post_init__(self) -> None:
        _check_method(self.method, self.threshold, column=None)

    def resolved_threshold(self, alpha: float) -> float:
        """The threshold actually applied: explicit, else the method default, else ``alpha``."""
        if self.threshold is not None:
            return float(self.threshold)
        default = METHODS[self.method].default_threshold
        return float(alpha if default is None else default)

    def __str__(self) -> str:
        return self.method if self.threshold is None else f"{self.method}:{self.threshold:g}"


def _check_method(method: str, threshold: float | None, column: str | None) -> None:
    where = f"column {column!r}: " if column is not None else ""
    if method not in METHODS:
        raise ValueError(f"{where}unknown drift method {method!r}; allowed: {_allowed()}.")
    if threshold is None:
        return
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise ValueError(f"{where}method {method!r}: threshold {threshold!r} is not a finite number.")
    if METHODS[method].score_type == "p_value" and not 0.0 < threshold < 1.0:
        raise ValueError(f"{where}method {method!r}: threshold {threshold!r} is a p-value level and "
                         "must be in (0, 1), e.g. 0.05.")
    if METHODS[method].score_type == "distance" and threshold <= 0.0:
        raise ValueError(f"{where}method {method!r}: threshold {threshold!r} is a distance and must be > 0.")


def _make_method(column: str, method: str, threshold: Any) -> ColumnMethod:
    name = str(method).strip().lower()
    name = _ALIASES.get(name, name)
    if threshold is not None and not isinstance(threshold, int | float):
        try:
            threshold = float(str(threshold).strip())
        except ValueError:
            raise ValueError(f"column {column!r}: method {name!r}: threshold {threshold!r} is not a "
                             "number (expected e.g. 'ks:0.01' or 'psi:0.2').") from None
    _check_method(name, None if threshold is None else float(threshold), column)
    return ColumnMethod(name, None if threshold is None else float(threshold))


def _parse_one(column: str, value: Any) -> ColumnMethod:
    if isinstance(value, ColumnMethod):
        _check_method(value.method, value.threshold, column)
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"method", "threshold"}
        if "method" not in value or unknown:
            raise ValueError(f"column {column!r}: expected {{'method': ..., 'threshold': ...}}, got "
                             f"{dict(value)!r}; allowed methods: {_allowed()}.")
        return _make_method(column, value["method"], value.get("threshold"))
    if isinstance(value, str):
        method, sep, threshold = value.partition(":")
        return _make_method(column, method, threshold if sep else None)
    raise ValueError(f"column {column!r}: cannot read drift method from {value!r}; expected 'method' or "
                     f"'method:threshold' with method one of: {_allowed()}.")


def parse_methods(spec: str | Mapping[str, Any] | None) -> dict[str, ColumnMethod]:
    """Parse per-column drift methods.

    Accepts a spec string ``"age=ks:0.01,city=psi:0.2,income=wasserstein"`` (threshold optional),
    a path to a ``.json``/``.yaml``/``.yml`` file holding a mapping, or a mapping (e.g. from YAML or
    JSON) whose values are ``"psi"``, ``"psi:0.2"`` or ``{"method": "psi", "threshold": 0.2}``.
    Column names containing ``,`` cannot be written in the spec string: use a mapping/file for them.

    Raises:
        ValueError: naming the column, the method and what is allowed.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(column): _parse_one(str(column), value) for column, value in spec.items()}
    if not isinstance(spec, str):
        raise ValueError(f"drift methods must be a string or a mapping, got {type(spec).__name__}.")
    text = spec.strip()
    if not text:
        return {}
    if "=" not in text and (text.lower().endswith((".json", ".yaml", ".yml")) or os.path.isfile(text)):
        return parse_methods(_load_methods_file(Path(text)))
    methods: dict[str, ColumnMethod] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        column, sep, value = item.rpartition("=")  # a method never contains '=', a column name might
        column = column.strip()
        if not sep or not column or not value.strip():
            raise ValueError(f"drift method item {item.strip()!r} is not 'column=method[:threshold]' "
                             f"(e.g. 'age=ks:0.01'); allowed methods: {_allowed()}.")
        methods[column] = _parse_one(column, value.strip())
    return methods


def _load_methods_file(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read drift methods file {str(path)!r}: {exc}") from None
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, Mapping):
        raise ValueError(f"drift methods file {str(path)!r} must hold a mapping column -> method.")
    return data


def methods_to_spec(methods: Mapping[str, ColumnMethod]) -> str:
    """The spec string form of per-column methods (inverse of :func:`parse_methods`)."""
    return ",".join(f"{column}={method}" for column, method in methods.items())


def parse_defaults(num_method: str | ColumnMethod,
                   cat_method: str | ColumnMethod) -> tuple[ColumnMethod, ColumnMethod]:
    """The default methods of numeric and of categorical columns, checked to fit their kind."""
    num_default = _parse_one("<numeric default>", num_method)
    cat_default = _parse_one("<categorical default>", cat_method)
    if "numeric" not in METHODS[num_default.method].kinds:
        raise ValueError(f"num_method {num_default.method!r} does not apply to numeric columns; allowed: "
                         f"{', '.join(m for m, i in METHODS.items() if 'numeric' in i.kinds)}.")
    if "categorical" not in METHODS[cat_default.method].kinds:
        raise ValueError(f"cat_method {cat_default.method!r} does not apply to categorical columns; allowed: "
                         f"{', '.join(m for m, i in METHODS.items() if 'categorical' in i.kinds)}.")
    return num_default, cat_default


def method_for_column(name: str, kind: ColumnKind, numeric_dtype: bool, dtype: Any,
                      requested: ColumnMethod | None, num_method: ColumnMethod,
                      cat_method: ColumnMethod) -> tuple[ColumnMethod, ColumnKind]:
    """The method that tests column ``name`` and the kind it is tested as.

    ``kind`` is the column's kind by the reference, ``numeric_dtype`` whether its values are numbers
    (``dtype`` only names it in errors). Without a ``requested`` method the default of the kind runs.

    Raises:
        ValueError: the method does not apply to the column.
    """
    method = requested or (num_method if kind == "numeric" else cat_method)
    if requested is not None:
        # A requested method decides how the column is treated when its dtype allows it.
        if method.method in ("ks", "wasserstein"):
            if not numeric_dtype:
                raise ValueError(f"column {name!r}: method {method.method!r} needs numeric values but the "
                                 f"column is categorical (dtype {dtype}); allowed for it: "
                                 f"{', '.join(m for m, i in METHODS.items() if 'categorical' in i.kinds)}.")
            kind = "numeric"
        elif method.method == "chi2":
            kind = "categorical"
    if kind not in METHODS[method.method].kinds:  # e.g. a numeric default method on a categorical column
        raise ValueError(f"column {name!r}: method {method.method!r} does not apply to {kind} columns.")
    return method, kind
