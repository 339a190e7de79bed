"""How each column is judged: a significance test, an effect-size floor, a missing-value rule.

Kept apart from the statistics (:mod:`.drift_stats`) because it is configuration, not computation:
what users write (``-C drift_methods=...``, ``-C drift_effect_floor=...``, a methods file,
:class:`.report_job.DriftSettings`) is parsed and validated here, and the choice of test and effect
size for each column is made here; the statistics module only computes. No numpy, pandas or scipy.

**A column is drifted when its values drifted or its missing-value rate did** (or it vanished):

* *values*: the two-sample test is significant (p < level) **and** the effect size is at least its
  floor. The test alone flags practically nothing at volume (a 0.03-SD shift is "significant" with
  200k rows a side); the floor alone flags sampling noise at small volume. Both together mean "real
  and large enough to matter" at any volume.
* *missing values*: a two-proportion z-test on the missing-value rates is significant (p < level)
  **and** the rate changed by at least the missing floor (absolute, default 0.05 = 5 points).
* a column the reference has but the current window lacks, or whose current values are all missing,
  is drifted (the reason says which).

Methods (names as written in ``-C drift_methods=...``):

=================  ======  ===========  ============================================  =============
name               role    column kind  what                                          default
=================  ======  ===========  ============================================  =============
``ks``             test    numeric      two-sample Kolmogorov-Smirnov, p-value        level alpha
``chi2``           test    any          two-sample chi-square test of homogeneity     level alpha
                                        (contingency table reference vs current)
``wasserstein``    effect  numeric      Wasserstein-1 distance / reference std        floor 0.1
``jensenshannon``  effect  any          Jensen-Shannon distance (natural log)         floor 0.1
``psi``            effect  any          population stability index                    floor 0.2
=================  ======  ===========  ============================================  =============

Defaults: numeric columns ``ks`` + ``wasserstein`` >= 0.1, categorical ones ``chi2`` +
``jensenshannon`` >= 0.1 (Evidently's large-sample defaults as floors), missing-rate change >= 0.05,
alpha 0.05. The tests are proper two-sample tests: under no drift a column's test fires with
probability ~alpha whatever the sample sizes, and the floors only lower that.

Per column, ``column=part[+part...]`` with parts ``test[:level]``, ``effect[:floor]`` and
``missing:floor``, each optional: ``age=ks:0.01`` (level 0.01, default floor),
``age=wasserstein:0.2`` (default test, floor 0.2), ``city=chi2:0.01+psi:0.25+missing:0.1``, and
``age=ks+wasserstein:0`` (floor 0: the test alone decides). Globally, ``-C drift_effect_floor=0.2``
(numeric and categorical floors) or ``numeric=0.2,categorical=0.15,missing=0.1``
(:func:`parse_floors`). A floor given globally applies to the kind's default effect size; an effect
named for a column without a floor uses that method's default.

A column's kind is decided on the reference (:func:`.drift_stats.column_kind`); a test chosen for a
column overrides it where the values allow: ``chi2`` on a numeric column treats its values as
categories; ``ks``/``wasserstein`` need numeric values.
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
Role = Literal["test", "effect"]

#: Default effect-size floors and missing-rate floor (see the module docstring).
DEFAULT_NUM_FLOOR = 0.1
DEFAULT_CAT_FLOOR = 0.1
DEFAULT_MISSING_FLOOR = 0.05
#: The test and the effect size of each kind when nothing is asked for.
KIND_DEFAULTS: dict[ColumnKind, tuple[str, str]] = {"numeric": ("ks", "wasserstein"),
                                                      "categorical": ("chi2", "jensenshannon")}


@dataclass(frozen=True)
class _MethodInfo:
    role: Role
    kinds: tuple[ColumnKind, ...]
    score_type: ScoreType
    default_threshold: float | None  # None: use ``alpha`` (tests) / the kind's global floor
    description: str


METHODS: dict[str, _MethodInfo] = {
    "ks": _MethodInfo("test", ("numeric",), "p_value", None, "two-sample Kolmogorov-Smirnov test (p-value)"),
    "chi2": _MethodInfo("test", ("numeric", "categorical"), "p_value", None,
                        "two-sample chi-square test of homogeneity (p-value)"),
    "psi": _MethodInfo("effect", ("numeric", "categorical"), "distance", 0.2, "population stability index"),
    "wasserstein": _MethodInfo("effect", ("numeric",), "distance", DEFAULT_NUM_FLOOR,
                               "Wasserstein-1 distance normed by the reference std"),
    "jensenshannon": _MethodInfo("effect", ("numeric", "categorical"), "distance", DEFAULT_CAT_FLOOR,
                                 "Jensen-Shannon distance (natural log)"),
}
_ALIASES = {"js": "jensenshannon", "wasserstein_norm": "wasserstein", "chi2_contingency": "chi2",
            "chisquare_homogeneity": "chi2"}
#: The part of a column spec that sets its missing-rate floor (``missing:0.1``).
MISSING = "missing"
#: Short labels used in verdict texts.
LABELS = {"ks": "KS", "chi2": "chi-square", "psi": "PSI", "wasserstein": "Wasserstein/std",
          "jensenshannon": "Jensen-Shannon"}


def _allowed() -> str:
    return ", ".join(METHODS)


def _of_role(role: Role, kind: ColumnKind | None = None) -> str:
    return ", ".join(m for m, i in METHODS.items() if i.role == role and (kind is None or kind in i.kinds))


@dataclass(frozen=True)
class ColumnMethod:
    """How one column is judged; every part left None takes its default.

    ``method``/``threshold`` are the test and its p-value level, ``effect``/``floor`` the effect
    size and its floor (0 turns the floor off), ``missing_floor`` the smallest change of the
    missing-value rate that counts. For compatibility an effect-size method given as ``method``
    (``ColumnMethod("psi", 0.2)``) is read as ``effect``/``floor``.
    """

    method: str | None = None
    threshold: float | None = None
    effect: str | None = None
    floor: float | None = None
    missing_floor: float | None = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method in METHODS and METHODS[self.method].role == "effect":
            if self.effect is not None:
                raise ValueError(f"two effect sizes given: {self.method!r} and {self.effect!r}.")
            object.__setattr__(self, "effect", self.method)
            object.__setattr__(self, "floor", self.threshold)
            object.__setattr__(self, "method", None)
            object.__setattr__(self, "threshold", None)
        _check(self, column=None)

    def resolved_threshold(self, alpha: float) -> float:
        """The p-value level actually applied: explicit, else ``alpha``."""
        return float(alpha if self.threshold is None else self.threshold)

    def __str__(self) -> str:
        parts = []
        if self.method is not None:
            parts.append(self.method if self.threshold is None else f"{self.method}:{self.threshold:g}")
        if self.effect is not None:
            parts.append(self.effect if self.floor is None else f"{self.effect}:{self.floor:g}")
        if self.missing_floor is not None:
            parts.append(f"{MISSING}:{self.missing_floor:g}")
        return "+".join(parts)


def _check(spec: ColumnMethod, column: str | None) -> None:
    where = f"column {column!r}: " if column is not None else ""
    roles: tuple[tuple[str | None, Role], ...] = ((spec.method, "test"), (spec.effect, "effect"))
    for name, role in roles:
        if name is None:
            continue
        if name not in METHODS:
            raise ValueError(f"{where}unknown drift method {name!r}; allowed: {_allowed()}.")
        if METHODS[name].role != role:
            raise ValueError(f"{where}{name!r} is not {'a test' if role == 'test' else 'an effect-size'} method; allowed: {_of_role(role)}.")
    if spec.method is None and spec.threshold is not None:
        raise ValueError(f"{where}a p-value level needs a test ({_of_role('test')}).")
    if spec.effect is None and spec.floor is not None:
        raise ValueError(f"{where}a floor needs an effect size ({_of_role('effect')}).")
    for value, what in ((spec.threshold, spec.method), (spec.floor, spec.effect), (spec.missing_floor, MISSING)):
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{where}method {what!r}: threshold {value!r} is not a finite number.")
    if spec.threshold is not None and not 0.0 < spec.threshold < 1.0:
        raise ValueError(f"{where}method {spec.method!r}: threshold {spec.threshold!r} is a p-value level and "
                         "must be in (0, 1), e.g. 0.05.")
    if spec.floor is not None and spec.floor < 0.0:
        raise ValueError(f"{where}method {spec.effect!r}: threshold {spec.floor!r} is a distance floor and "
                         "must be >= 0 (0 turns the floor off).")
    if spec.missing_floor is not None and not 0.0 <= spec.missing_floor <= 1.0:
        raise ValueError(f"{where}method {MISSING!r}: threshold {spec.missing_floor!r} is a change of the "
                         "missing-value rate and must be in [0, 1], e.g. 0.05.")


def _number(column: str, name: str, value: Any) -> float | None:
    if value is None or isinstance(value, int | float):
        return value
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError(f"column {column!r}: method {name!r}: threshold {value!r} is not a "
                         "number (expected e.g. 'ks:0.01' or 'psi:0.2').") from None


def _canonical(name: Any) -> str:
    text = str(name).strip().lower()
    return _ALIASES.get(text, text)


def _make(column: str, parts: list[tuple[str, Any]]) -> ColumnMethod:
    """A ColumnMethod from (name, value) parts, each a test, an effect or ``missing``."""
    values: dict[str, Any] = {}
    for raw_name, raw_value in parts:
        name = _canonical(raw_name)
        value = _number(column, name, raw_value)
        slot: tuple[str, str | None]
        if name == MISSING:
            slot = ("missing_floor", None)
        elif name in METHODS:
            slot = ("method", "threshold") if METHODS[name].role == "test" else ("effect", "floor")
        else:
            raise ValueError(f"column {column!r}: unknown drift method {name!r}; allowed: {_allowed()} "
                             f"(and '{MISSING}:<floor>').")
        if slot[0] in values:
            raise ValueError(f"column {column!r}: more than one {slot[0].replace('_', ' ')} given "
                             f"({values[slot[0]]!r} and {name!r}).")
        if slot[1] is None:
            if value is None:
                raise ValueError(f"column {column!r}: '{MISSING}' needs a floor, e.g. '{MISSING}:0.1'.")
            values[slot[0]] = float(value)
        else:
            values[slot[0]] = name
            values[slot[1]] = None if value is None else float(value)
    try:
        return ColumnMethod(**values)
    except ValueError as exc:
        raise ValueError(f"column {column!r}: {exc}") from None


def _parse_one(column: str, value: Any) -> ColumnMethod:
    if isinstance(value, ColumnMethod):
        _check(value, column)
        return value
    if isinstance(value, Mapping):
        allowed = {"method", "threshold", "effect", "floor", "missing_floor"}
        unknown = set(value) - allowed
        if unknown or not set(value) & {"method", "effect", "missing_floor"}:
            raise ValueError(f"column {column!r}: expected {{'method': ..., 'threshold': ..., 'effect': ..., "
                             f"'floor': ..., 'missing_floor': ...}}, got {dict(value)!r}; allowed methods: "
                             f"{_allowed()}.")
        parts: list[tuple[str, Any]] = []
        if value.get("method") is not None:
            parts.append((value["method"], value.get("threshold")))
        if value.get("effect") is not None:
            parts.append((value["effect"], value.get("floor")))
        if value.get("missing_floor") is not None:
            parts.append((MISSING, value["missing_floor"]))
        return _make(column, parts)
    if isinstance(value, str):
        parts = []
        for part in value.split("+"):
            name, sep, level = part.strip().partition(":")
            if not name.strip():
                raise ValueError(f"column {column!r}: empty part in {value!r}; expected e.g. "
                                 "'ks:0.01+wasserstein:0.2+missing:0.1'.")
            parts.append((name, level if sep else None))
        return _make(column, parts)
    raise ValueError(f"column {column!r}: cannot read drift method from {value!r}; expected 'method' or "
                     f"'method:threshold' with method one of: {_allowed()}.")


def parse_methods(spec: str | Mapping[str, Any] | None) -> dict[str, ColumnMethod]:
    """Parse per-column drift methods.

    Accepts a spec string ``"age=ks:0.01,city=chi2+psi:0.2+missing:0.1,income=wasserstein:0.2"``
    (every part and threshold optional, see the module docstring), a path to a
    ``.json``/``.yaml``/``.yml`` file holding a mapping, or a mapping (e.g. from YAML or JSON) whose
    values are such strings or ``{"method": "ks", "threshold": 0.01, "effect": "psi", "floor": 0.2,
    "missing_floor": 0.1}`` (any subset of the keys).
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
                             f"(e.g. 'age=ks:0.01' or 'age=ks:0.01+wasserstein:0.2'); allowed methods: "
                             f"{_allowed()}.")
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


@dataclass(frozen=True)
class Floors:
    """Global floors: effect size of numeric and of categorical columns, missing-rate change."""

    numeric: float = DEFAULT_NUM_FLOOR
    categorical: float = DEFAULT_CAT_FLOOR
    missing: float = DEFAULT_MISSING_FLOOR

    def __post_init__(self) -> None:
        for name in ("numeric", "categorical", "missing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value < 0 or (name == "missing" and value > 1):
                raise ValueError(f"drift floor {name}={value!r}: expected a number >= 0"
                                 f"{' and <= 1' if name == 'missing' else ''} (0 turns the floor off).")

    def __str__(self) -> str:
        return f"numeric={self.numeric:g},categorical={self.categorical:g},missing={self.missing:g}"


_FLOOR_KEYS = {"numeric": "numeric", "num": "numeric", "categorical": "categorical", "cat": "categorical",
               "missing": "missing"}


def parse_floors(spec: str | float | Floors | None) -> Floors:
    """Global floors from ``-C drift_effect_floor``: ``"0.2"`` (numeric and categorical) or
    ``"numeric=0.2,categorical=0.15,missing=0.1"`` (any subset; the rest keep their defaults).

    Raises:
        ValueError: naming the bad part and what is allowed.
    """
    if spec is None:
        return Floors()
    if isinstance(spec, Floors):
        return spec
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return Floors(numeric=float(spec), categorical=float(spec))
    text = str(spec).strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return Floors(numeric=value, categorical=value)
    values: dict[str, float] = {}
    for item in text.split(","):
        key, sep, number = item.partition("=")
        name = _FLOOR_KEYS.get(key.strip().lower())
        if not sep or name is None:
            raise ValueError(f"drift floor item {item.strip()!r}: expected 'numeric=<floor>', "
                             "'categorical=<floor>' or 'missing=<floor>' (or one number for both effect floors).")
        try:
            values[name] = float(number.strip())
        except ValueError:
            raise ValueError(f"drift floor {key.strip()}={number.strip()!r} is not a number.") from None
    return Floors(**values)


@dataclass(frozen=True)
class Judgement:
    """What judges one column, fully resolved: kind, test and level, effect and floor, missing floor."""

    kind: ColumnKind
    test: str
    level: float
    effect: str
    floor: float
    missing_floor: float

    def describe(self) -> str:
        """E.g. ``ks p<0.05 + wasserstein>=0.1 + missing>=0.05``."""
        return f"{self.test} p<{self.level:g} + {self.effect}>={self.floor:g} + {MISSING}>={self.missing_floor:g}"


def parse_defaults(num_method: str | ColumnMethod,
                   cat_method: str | ColumnMethod) -> tuple[ColumnMethod, ColumnMethod]:
    """The default methods of numeric and of categorical columns, checked to fit their kind.

    Each may name a test, an effect size or both (``"ks"``, ``"ks:0.01+psi:0.2"``); what is not
    named comes from :data:`KIND_DEFAULTS` when a column is judged.
    """
    num_default = _parse_one("<numeric default>", num_method)
    cat_default = _parse_one("<categorical default>", cat_method)
    kinds: tuple[tuple[ColumnKind, ColumnMethod], ...] = (("numeric", num_default), ("categorical", cat_default))
    for kind, default in kinds:
        for name in (default.method, default.effect):
            if name is not None and kind not in METHODS[name].kinds:
                option = "num_method" if kind == "numeric" else "cat_method"
                role = METHODS[name].role
                raise ValueError(f"{option} {name!r} does not apply to {kind} columns; allowed: "
                                 f"{_of_role(role, kind)}.")
    return num_default, cat_default


def method_for_column(name: str, kind: ColumnKind, numeric_dtype: bool, dtype: Any,
                      requested: ColumnMethod | None, num_method: ColumnMethod,
                      cat_method: ColumnMethod, alpha: float = 0.05,
                      floors: Floors | None = None) -> Judgement:
    """How column ``name`` is judged: its kind, test, effect size and floors.

    ``kind`` is the column's kind by the reference, ``numeric_dtype`` whether its values are numbers
    (``dtype`` only names it in errors). A requested test decides the kind where the values allow
    (``ks`` numeric, ``chi2`` categorical), as does a requested ``wasserstein`` without a test; the
    rest comes from the kind's default method, then :data:`KIND_DEFAULTS`. A floor not given comes
    from ``floors`` when the effect is the kind's default one, else from the method's default.

    Raises:
        ValueError: the method does not apply to the column.
    """
    floors = floors or Floors()
    requested = requested or ColumnMethod()
    needs_numeric = [m for m in (requested.method, requested.effect) if m in ("ks", "wasserstein")]
    if needs_numeric and not numeric_dtype:
        raise ValueError(f"column {name!r}: method {needs_numeric[0]!r} needs numeric values but the "
                         f"column is categorical (dtype {dtype}); allowed for it: "
                         f"{', '.join(m for m, i in METHODS.items() if 'categorical' in i.kinds)}.")
    if requested.method == "ks" or (requested.method is None and requested.effect == "wasserstein"):
        kind = "numeric"
    elif requested.method == "chi2":
        kind = "categorical"
    default = num_method if kind == "numeric" else cat_method
    test = requested.method or default.method or KIND_DEFAULTS[kind][0]
    level = requested.threshold if requested.method else (
        default.threshold if default.method == test else None)
    effect = requested.effect or default.effect or KIND_DEFAULTS[kind][1]
    for method in (test, effect):
        if kind not in METHODS[method].kinds:  # e.g. wasserstein on a column tested by chi2
            raise ValueError(f"column {name!r}: method {method!r} does not apply to {kind} columns "
                             f"(allowed: {_of_role(METHODS[method].role, kind)}).")
    if requested.effect is not None and requested.floor is not None:
        floor = requested.floor
    elif requested.effect is None and default.effect == effect and default.floor is not None:
        floor = default.floor
    elif effect == KIND_DEFAULTS[kind][1]:
        floor = floors.numeric if kind == "numeric" else floors.categorical
    else:
        floor = METHODS[effect].default_threshold or 0.0
    missing_floor = requested.missing_floor if requested.missing_floor is not None else (
        default.missing_floor if default.missing_floor is not None else floors.missing)
    return Judgement(kind=kind, test=test, level=float(alpha if level is None else level), effect=effect,
                     floor=float(floor), missing_floor=float(missing_floor))
