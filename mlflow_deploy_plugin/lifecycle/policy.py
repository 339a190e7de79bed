"""Per-model lifecycle policies: a YAML file that says how a registered model is promoted and guarded.

One file per registered model. Every key except ``model`` is optional; the defaults are shown in
the comments. Errors name the file, the line and the key path (``promotion.gates.metrics[1]``), and
unknown keys are rejected with a "did you mean" suggestion, because a misspelt gate that is
silently ignored is a gate that never runs.

.. code-block:: yaml

    model: churn                  # registered model name (required)
    registry: alias               # alias (default, MLflow 3) | stage (deprecated, still supported)
    champion: champion            # alias of the live version; default "champion", or "Production"
                                  #   when registry: stage
    challenger: challenger        # alias of the candidate; default "challenger", or "Staging"
    promotion:
      enabled: true               # default true; false = gates may be evaluated but never promote
      gates:
        # Metrics of the candidate's source run. Operators: >= > <= < ==. Default: none.
        metrics: ["accuracy >= 0.9", "f1 > 0.8"]
        # How much worse than the champion the candidate may be (absolute). A bare number means
        # "higher is better"; the mapping form says which direction is better. Default: none.
        max_regression:
          accuracy: 0.01
          latency_ms: {margin: 5, lower_is_better: true}
        allow_missing_champion_metrics: false  # default false: a champion metric that cannot be
                                               # read fails its max_regression gate (fail closed)
        signature_compatible: true   # default true: the candidate accepts what the live version accepts
        smoke_test: true             # default true: the candidate predicts its own input example
      # Shadow stage after the gates, before the canary: the challenger answers a copy of the live
      # requests (-C shadow), nobody receives its answers, and it is judged on the pairs. Omitted or
      # `shadow: false` = no shadow stage; `shadow: true` or a mapping = the defaults below.
      shadow:
        sample_rate: 1.0          # share of captured requests mirrored to the challenger, 0 < r <= 1
        min_requests: 200         # judge once this many requests were answered by both ...
        max_minutes: 60           # ... or, at this point, there is not enough evidence:
        insufficient_evidence: reject   # reject | extend
        min_agreement: 0.95       # classification: share of rows both answered alike; null = not checked
        max_mean_abs_difference: null   # regression: mean |shadow - primary|; null = not checked
        max_error_rate: 0.01      # how much higher the shadow's error share may be than the primary's; null = not checked
        not_worse_on_labels: true # with >= min_labelled_rows labelled pairs, the challenger must not be
        min_labelled_rows: 100    #   significantly worse (McNemar / paired Wilcoxon at alpha 0.05)
      # Canary stage after the gates. Omitted or `canary: false` = no canary (promote once the gates
      # pass); `canary: true` or a mapping = canary with the defaults below.
      canary:
        percent: 10               # share of live traffic sent to the challenger, 0 < p < 100
        min_requests: 200         # judge once the challenger has answered this many requests ...
        max_minutes: 30           # ... or, at this point, say there is not enough evidence:
        insufficient_evidence: reject   # reject | extend (keep waiting for min_requests)
        max_error_rate: 0.01      # how much higher the challenger's share of non-2xx answers may be
                                  # than the champion's over the same window, 0..1; null = not checked
        max_p99_latency_ms: 250   # p99 latency of the challenger's successful answers; null = not checked
        require_no_drift: false   # the rows the challenger answered in its canary must not drift
                                  #   (judged against its own reference; no verdict yet = wait)
        quality_margin: null      # labelled quality (accuracy; MAE for regressors) may be worse than the
                                  #   champion's on the same window by at most this; null = not checked
        min_labelled_rows: 100    # ... judged once each side has this many labelled rows (else waits)
    drift:
      consecutive_reports: 3      # act when the served version is "drifted" in K reports in a row
      action: tag                 # tag | rollback | archive
    # Decisions on labelled quality (mlflow-deploy labels / quality report). Omitted = none.
    quality:
      figure: accuracy            # a figure of the quality report: accuracy, f1_macro, roc_auc, mae, rmse...
      floor: 0.85                 # act when the figure is significantly worse than this; null = not checked
      max_drop: 0.05              # ... or significantly worse than the version's training figure by more
                                  #   than this; null = not checked (at least one of the two is needed)
      consecutive_reports: 2      # in K windows in a row (latest report of each window)
      action: tag                 # tag | rollback | archive
      use_estimates: false        # true: a window with no labels yet is judged on CBPE's estimated
                                  #   accuracy (figure: accuracy only); false: such windows are skipped
    # Receivers of this deployment's events, besides -C notify (same meaning as the -C notify_* keys).
    notify:
      urls: [https://alerts.example.com/mlflow, slack+https://hooks.slack.com/services/T/B/X]
      format: json                # json | slack: shape of the URLs without a slack+ prefix
      events: all                 # names, kinds or patterns; "!" excludes, e.g. "lifecycle,verdicts"

``registry: stage`` roles must be ``Staging`` or ``Production`` (case-insensitive; stored in
MLflow's canonical spelling): ``None`` and ``Archived`` are valid stage names but hold versions that
are not served, so they cannot be a champion or challenger. Alias roles follow MLflow's alias rules
(letters, digits, ``_`` and ``-``; not ``latest``, not ``v<digits>``).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

RegistryMode = Literal["alias", "stage"]
DriftAction = Literal["tag", "rollback", "archive"]

# Stage names MLflow knows, keyed by their lower-case form (stage names are case-insensitive).
STAGES = {"none": "None", "staging": "Staging", "production": "Production", "archived": "Archived"}
# Only these stages hold versions that are served, so only they can be a role.
_ROLE_STAGES = ("Staging", "Production")
DRIFT_ACTIONS: tuple[str, ...] = ("tag", "rollback", "archive")
METRIC_OPERATORS: tuple[str, ...] = (">=", ">", "<=", "<", "==")

# Same rules as mlflow.utils.validation for alias names, checked here so a bad alias is reported
# with the policy line instead of failing later at set_registered_model_alias.
_ALIAS_RE = re.compile(r"^[\w\-]+$")
_VERSION_ALIAS_RE = re.compile(r"^[vV]\d+$")
# "<metric name> <op> <number>". Metric names may hold letters, digits, _ - . / and spaces (MLflow's
# rules); the lazy name group stops at the first operator character.
_METRIC_EXPR_RE = re.compile(r"^\s*(?P<metric>[\w][\w\-./ ]*?)\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>\S+)\s*$")


def _non_negative(value: float) -> bool:
    return value >= 0


class PolicyError(ValueError):
    """A policy file is invalid. ``str(err)`` reads ``<source>:<line>: <key>: <message>``."""

    def __init__(self, message: str, *, source: str, line: int | None, key: str | None) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.key = key
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


@dataclass(frozen=True)
class MetricThreshold:
    """One ``"<metric> <op> <number>"`` gate on the candidate's source-run metrics."""

    metric: str
    op: str
    threshold: float
    expression: str

    def holds(self, value: float) -> bool:
        """Whether ``value`` satisfies the threshold."""
        return _OPERATORS[self.op](value, self.threshold)


@dataclass(frozen=True)
class RegressionLimit:
    """How much worse than the champion a candidate's metric may be (absolute difference)."""

    metric: str
    margin: float
    lower_is_better: bool = False


@dataclass(frozen=True)
class GatesPolicy:
    """Checks a candidate must pass before it may become champion (or start a canary)."""

    metrics: tuple[MetricThreshold, ...] = ()
    max_regression: tuple[RegressionLimit, ...] = ()
    signature_compatible: bool = True
    smoke_test: bool = True
    # A regression gate whose champion metric cannot be read fails (closed) unless this is set.
    allow_missing_champion_metrics: bool = False


@dataclass(frozen=True)
class CanaryPolicy:
    """How a challenger is tried on a share of live traffic before it takes over."""

    percent: float = 10.0
    min_requests: int = 200
    max_minutes: float = 30.0
    max_error_rate: float | None = 0.01
    max_p99_latency_ms: float | None = 250.0
    require_no_drift: bool = False
    insufficient_evidence: Literal["reject", "extend"] = "reject"
    # The `quality` check (lifecycle/canary.py): labelled accuracy (classifiers) or MAE (regressors)
    # of the challenger vs the champion over the canary window; None = not checked.
    quality_margin: float | None = None
    min_labelled_rows: int = 100


@dataclass(frozen=True)
class ShadowPolicy:
    """How a challenger is tried on a copy of live traffic (its answers returned to nobody)."""

    sample_rate: float = 1.0
    min_requests: int = 200
    max_minutes: float = 60.0
    insufficient_evidence: Literal["reject", "extend"] = "reject"
    min_agreement: float | None = 0.95
    max_mean_abs_difference: float | None = None
    max_error_rate: float | None = 0.01
    not_worse_on_labels: bool = True
    min_labelled_rows: int = 100


@dataclass(frozen=True)
class PromotionPolicy:
    """Whether and how challengers are promoted. ``canary`` None = promote once the gates pass;
    ``shadow`` None = no shadow stage before the canary (or the promotion)."""

    enabled: bool = True
    gates: GatesPolicy = field(default_factory=GatesPolicy)
    canary: CanaryPolicy | None = None
    shadow: ShadowPolicy | None = None


@dataclass(frozen=True)
class DriftPolicy:
    """What to do when the served version keeps drifting."""

    consecutive_reports: int = 3
    action: DriftAction = "tag"


# Quality figures where lower is better; every other figure is higher-is-better.
LOWER_IS_BETTER_FIGURES = frozenset({"mae", "rmse", "mape", "log_loss"})


@dataclass(frozen=True)
class QualityPolicy:
    """What to do when the served version's labelled quality keeps falling short.

    "Significantly worse": the whole 95 % interval of the window's figure lies beyond the limit
    (a one-sided test at alpha = 0.025), so one unlucky window of few labels does not count.
    """

    figure: str = "accuracy"
    floor: float | None = None
    max_drop: float | None = None
    consecutive_reports: int = 2
    action: DriftAction = "tag"
    #: Judge windows without labels yet on CBPE's estimate (its 95 % interval, as a measured figure's).
    use_estimates: bool = False

    @property
    def lower_is_better(self) -> bool:
        return self.figure in LOWER_IS_BETTER_FIGURES


@dataclass(frozen=True)
class NotifyPolicy:
    """Receivers named in the policy file (``lifecycle/notifier.py`` adds them to ``-C notify``'s)."""

    urls: str  # comma-separated, as -C notify
    format: str = "json"
    events: str = "all"


@dataclass(frozen=True)
class Policy:
    """The validated policy of one registered model."""

    model: str
    registry: RegistryMode = "alias"
    champion: str = "champion"
    challenger: str = "challenger"
    promotion: PromotionPolicy = field(default_factory=PromotionPolicy)
    drift: DriftPolicy = field(default_factory=DriftPolicy)
    source: str = "<string>"  # where it was read from, for messages and audit records
    quality: QualityPolicy | None = None
    notify: NotifyPolicy | None = None

    def role_uri(self, role: Literal["champion", "challenger"]) -> str:
        """The ``models:/`` URI of a role: ``models:/churn@champion`` or ``models:/churn/Production``."""
        ref = self.champion if role == "champion" else self.challenger
        return f"models:/{self.model}@{ref}" if self.registry == "alias" else f"models:/{self.model}/{ref}"


_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
}


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at ``path``; raise PolicyError naming file, line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file: {exc.strerror or exc}", source=str(path), line=None,
                          key=None) from exc
    return parse_policy(text, source=str(path))


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Validate policy YAML ``text``; ``source`` names it in error messages."""
    return _Parser(text, source).parse()


# --- parsing ---------------------------------------------------------------------------------------
# The YAML is composed into nodes (not loaded into plain dicts) so every value keeps its line.

_TOP_KEYS = ("model", "registry", "champion", "challenger", "promotion", "drift", "quality", "notify")
_PROMOTION_KEYS = ("enabled", "gates", "canary", "shadow")
_SHADOW_KEYS = ("sample_rate", "min_requests", "max_minutes", "insufficient_evidence", "min_agreement",
                "max_mean_abs_difference", "max_error_rate", "not_worse_on_labels", "min_labelled_rows")
_GATE_KEYS = ("metrics", "max_regression", "signature_compatible", "smoke_test",
              "allow_missing_champion_metrics")
_REGRESSION_KEYS = ("margin", "lower_is_better")
_CANARY_KEYS = ("percent", "min_requests", "max_minutes", "insufficient_evidence", "max_error_rate",
                "max_p99_latency_ms", "require_no_drift", "quality_margin", "min_labelled_rows")
INSUFFICIENT_EVIDENCE = ("reject", "extend")
_DRIFT_KEYS = ("consecutive_reports", "action")
_QUALITY_KEYS = ("figure", "floor", "max_drop", "consecutive_reports", "action", "use_estimates")
_NOTIFY_KEYS = ("urls", "format", "events")
_MISSING = object()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def _operator_hint(text: str) -> str:
    """A suggestion for the usual operator slips in a metric expression."""
    for wrong, right in (("=>", ">="), ("=<", "<="), ("!=", None), ("≥", ">="), ("≤", "<=")):
        if wrong in text:
            return f" (did you mean {right!r}?)" if right else f" ({wrong!r} is not supported)"
    if re.search(r"(?<![<>=!])=(?!=)", text):
        return " (did you mean '=='?)"
    return ""


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self._loader: yaml.SafeLoader | None = None

    # -- errors and node helpers

    def error(self, message: str, node: Node | None, key: str | None) -> PolicyError:
        line = node.start_mark.line + 1 if node is not None else None
        return PolicyError(message, source=self.source, line=line, key=key)

    def scalar(self, node: Node) -> Any:
        """The Python value of a scalar node, typed by YAML's resolver (so `10` is int, `yes` bool)."""
        assert self._loader is not None
        try:
            return self._loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # e.g. a !!python/object tag, which the safe loader refuses
            raise self.error(f"unsupported YAML value {node.value!r}: {getattr(exc, 'problem', exc)}",
                             node, None) from None

    def mapping(self, node: Node, path: str, allowed: tuple[str, ...]) -> dict[str, tuple[Node, Node]]:
        """Key -> (key node, value node); unknown and duplicate keys are errors."""
        if not isinstance(node, MappingNode):
            raise self.error(f"expected a mapping, got {self.describe(node)}", node, path or None)
        items: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node) if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                raise self.error(f"keys must be strings, got {self.describe(key_node)}", key_node, path or None)
            key_path = f"{path}.{key}" if path else key
            if key in items:
                first = items[key][0].start_mark.line + 1
                raise self.error(f"duplicate key (first set on line {first})", key_node, key_path)
            if allowed and key not in allowed:
                raise self.error(self.unknown_key_message(key, allowed), key_node, key_path)
            items[key] = (key_node, value_node)
        return items

    @staticmethod
    def unknown_key_message(key: str, allowed: tuple[str, ...]) -> str:
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {key!r}{hint} (allowed: {', '.join(allowed)})"

    def describe(self, node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        value = self.scalar(node)
        return f"{_type_name(value)} ({node.value!r})" if value is not None else "null"

    def get(self, items: dict[str, tuple[Node, Node]], key: str) -> Node | None:
        return items[key][1] if key in items else None

    def string(self, node: Node, key: str) -> str:
        value = self.scalar(node) if isinstance(node, ScalarNode) else _MISSING
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"expected a non-empty string, got {self.describe(node)}", node, key)
        return value.strip()

    def boolean(self, node: Node, key: str) -> bool:
        value = self.scalar(node) if isinstance(node, ScalarNode) else _MISSING
        if not isinstance(value, bool):
            raise self.error(f"expected true or false, got {self.describe(node)}", node, key)
        return value

    def number(self, node: Node, key: str, *, integer: bool = False, nullable: bool = False,
               check: Callable[[float], bool] | None = None, range_text: str = "") -> Any:
        value = self.scalar(node) if isinstance(node, ScalarNode) else _MISSING
        if value is None and nullable:
            return None
        # bool is an int subclass in Python: `percent: yes` must not read as 1.
        ok_types = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            kind = "an integer" if integer else "a number"
            raise self.error(f"expected {kind}{' or null' if nullable else ''}, got {self.describe(node)}",
                             node, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(f"expected a finite number, got {node.value!r}", node, key)
        if check is not None and not check(value):
            raise self.error(f"{value} is out of range: must be {range_text}", node, key)
        return value if integer else float(value)

    # -- sections

    def parse(self) -> Policy:
        self._loader = yaml.SafeLoader(self.text)
        try:
            try:
                root = self._loader.get_single_node()
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                line = mark.line + 1 if mark is not None else None
                problem = " ".join(part for part in (exc.context, exc.problem) if part)
                raise PolicyError(f"invalid YAML: {problem}", source=self.source, line=line, key=None) from None
            except yaml.YAMLError as exc:
                raise PolicyError(f"invalid YAML: {exc}", source=self.source, line=None, key=None) from None
            if root is None:
                raise PolicyError("the policy is empty: at least `model: <registered model name>` is needed",
                                  source=self.source, line=1, key=None)
            return self.policy(root)
        finally:
            self._loader.dispose()

    def policy(self, root: Node) -> Policy:
        items = self.mapping(root, "", _TOP_KEYS)
        if "model" not in items:
            raise self.error("required key is missing: the registered model name", root, "model")
        model = self.string(items["model"][1], "model")

        registry: RegistryMode = "alias"
        if (node := self.get(items, "registry")) is not None:
            value = self.string(node, "registry").lower()
            if value not in ("alias", "stage"):
                hint = "; 'stages' is spelt 'stage'" if value == "stages" else ""
                raise self.error(f"must be 'alias' or 'stage', got {node.value!r}{hint}", node, "registry")
            registry = "alias" if value == "alias" else "stage"

        defaults = {"alias": ("champion", "challenger"), "stage": ("Production", "Staging")}[registry]
        roles = {}
        for role, default in zip(("champion", "challenger"), defaults, strict=True):
            node = self.get(items, role)
            roles[role] = default if node is None else self.role(node, role, registry)
        if roles["champion"].lower() == roles["challenger"].lower():
            node = self.get(items, "challenger") or self.get(items, "champion") or root
            raise self.error(f"champion and challenger must differ (both are {roles['champion']!r})", node,
                             "challenger")

        promotion = PromotionPolicy()
        if (node := self.get(items, "promotion")) is not None:
            promotion = self.promotion(node)
        drift = DriftPolicy()
        if (node := self.get(items, "drift")) is not None:
            drift = self.drift(node)
        quality = None
        if (node := self.get(items, "quality")) is not None:
            quality = self.quality(node)
        notify = self.notify(node) if (node := self.get(items, "notify")) is not None else None
        return Policy(model=model, registry=registry, champion=roles["champion"],
                      challenger=roles["challenger"], promotion=promotion, drift=drift, source=self.source,
                      quality=quality, notify=notify)

    def role(self, node: Node, key: str, registry: RegistryMode) -> str:
        value = self.string(node, key)
        if registry == "stage":
            stage = STAGES.get(value.lower())
            if stage is None:
                raise self.error(f"{value!r} is not a stage name (registry: stage); stages are "
                                 f"{', '.join(STAGES.values())} (case-insensitive)", node, key)
            if stage not in _ROLE_STAGES:
                raise self.error(f"stage {stage!r} holds versions that are not served; a {key} must be "
                                 f"{' or '.join(_ROLE_STAGES)}", node, key)
            return stage
        if value.lower() in STAGES and value.lower() != "none":
            # The classic mix-up: a stage name under registry: alias would create an alias called
            # "Production" that no stage-based tooling looks at.
            raise self.error(f"{value!r} is a stage name but registry is 'alias'; set `registry: stage` "
                             "or use an alias name such as 'champion'", node, key)
        if not _ALIAS_RE.match(value) or len(value) > 255:
            raise self.error(f"{value!r} is not a valid alias: use letters, digits, '_' and '-' "
                             "(at most 255 characters)", node, key)
        if value.lower() == "latest" or _VERSION_ALIAS_RE.match(value):
            raise self.error(f"alias {value!r} is reserved by MLflow", node, key)
        return value

    def promotion(self, node: Node) -> PromotionPolicy:
        items = self.mapping(node, "promotion", _PROMOTION_KEYS)
        enabled = True
        if (sub := self.get(items, "enabled")) is not None:
            enabled = self.boolean(sub, "promotion.enabled")
        gates = GatesPolicy()
        if (sub := self.get(items, "gates")) is not None:
            gates = self.gates(sub)
        canary = None
        if (sub := self.get(items, "canary")) is not None:
            canary = self.canary(sub)
        shadow = None
        if (sub := self.get(items, "shadow")) is not None:
            shadow = self.shadow(sub)
        return PromotionPolicy(enabled=enabled, gates=gates, canary=canary, shadow=shadow)

    def shadow(self, node: Node) -> ShadowPolicy | None:
        if isinstance(node, ScalarNode):
            value = self.scalar(node)
            if isinstance(value, bool):
                return ShadowPolicy() if value else None
            if value is None:
                return ShadowPolicy()
        items = self.mapping(node, "promotion.shadow", _SHADOW_KEYS)
        path = "promotion.shadow"
        share = {"nullable": True, "check": lambda v: 0 <= v <= 1, "range_text": "between 0 and 1 (a share)"}
        specs: dict[str, dict[str, Any]] = {
            "sample_rate": {"check": lambda v: 0 < v <= 1, "range_text": "> 0 and <= 1"},
            "min_requests": {"integer": True, "check": lambda v: v >= 1, "range_text": ">= 1"},
            "max_minutes": {"check": lambda v: v > 0, "range_text": "> 0"},
            "min_agreement": share,
            "max_error_rate": share,
            "max_mean_abs_difference": {"nullable": True, "check": _non_negative, "range_text": ">= 0"},
            "min_labelled_rows": {"integer": True, "check": lambda v: v >= 1, "range_text": ">= 1"},
        }
        kwargs: dict[str, Any] = {}
        for key, spec in specs.items():
            if (sub := self.get(items, key)) is not None:
                kwargs[key] = self.number(sub, f"{path}.{key}", **spec)
        if (sub := self.get(items, "not_worse_on_labels")) is not None:
            kwargs["not_worse_on_labels"] = self.boolean(sub, f"{path}.not_worse_on_labels")
        if (sub := self.get(items, "insufficient_evidence")) is not None:
            kwargs["insufficient_evidence"] = self.choice(sub, f"{path}.insufficient_evidence",
                                                          INSUFFICIENT_EVIDENCE)
        return ShadowPolicy(**kwargs)

    def gates(self, node: Node) -> GatesPolicy:
        items = self.mapping(node, "promotion.gates", _GATE_KEYS)
        metrics: tuple[MetricThreshold, ...] = ()
        if (sub := self.get(items, "metrics")) is not None:
            metrics = self.metric_list(sub, "promotion.gates.metrics")
        regressions: tuple[RegressionLimit, ...] = ()
        if (sub := self.get(items, "max_regression")) is not None:
            regressions = self.regressions(sub, "promotion.gates.max_regression")
        flags = {}
        for key, default in (("signature_compatible", True), ("smoke_test", True),
                             ("allow_missing_champion_metrics", False)):
            sub = self.get(items, key)
            flags[key] = default if sub is None else self.boolean(sub, f"promotion.gates.{key}")
        return GatesPolicy(metrics=metrics, max_regression=regressions, **flags)

    def metric_list(self, node: Node, path: str) -> tuple[MetricThreshold, ...]:
        if isinstance(node, ScalarNode) and isinstance(self.scalar(node), str):
            # A single expression written without brackets is an easy slip; say so precisely.
            raise self.error(f'expected a list of expressions, e.g. ["{node.value}"]', node, path)
        if not isinstance(node, SequenceNode):
            raise self.error(f"expected a list of expressions, got {self.describe(node)}", node, path)
        thresholds = []
        for index, item in enumerate(node.value):
            thresholds.append(self.metric_expression(item, f"{path}[{index}]"))
        return tuple(thresholds)

    def metric_expression(self, node: Node, key: str) -> MetricThreshold:
        text = self.string(node, key)
        match = _METRIC_EXPR_RE.match(text)
        if match is None:
            hint = _operator_hint(text)
            raise self.error(f"malformed metric expression {text!r}{hint}: expected '<metric> <op> <number>' "
                             f"with op one of {' '.join(METRIC_OPERATORS)}, e.g. 'accuracy >= 0.9'", node, key)
        try:
            threshold = float(match["value"])
        except ValueError:
            raise self.error(f"malformed metric expression {text!r}: {match['value']!r} is not a number",
                             node, key) from None
        if not math.isfinite(threshold):
            raise self.error(f"malformed metric expression {text!r}: the threshold must be finite", node, key)
        return MetricThreshold(metric=match["metric"].strip(), op=match["op"], threshold=threshold,
                               expression=f"{match['metric'].strip()} {match['op']} {match['value']}")

    def regressions(self, node: Node, path: str) -> tuple[RegressionLimit, ...]:
        items = self.mapping(node, path, ())
        limits = []
        for metric, (_, value) in items.items():
            key = f"{path}.{metric}"
            if isinstance(value, MappingNode):
                sub = self.mapping(value, key, _REGRESSION_KEYS)
                if "margin" not in sub:
                    raise self.error("required key is missing: the allowed regression", value, f"{key}.margin")
                margin = self.number(sub["margin"][1], f"{key}.margin", check=_non_negative,
                                     range_text=">= 0")
                lower = sub.get("lower_is_better")
                lower_is_better = False if lower is None else self.boolean(lower[1], f"{key}.lower_is_better")
                limits.append(RegressionLimit(metric, margin, lower_is_better))
            else:
                if not isinstance(value, ScalarNode):
                    raise self.error(f"expected a number or {{margin: <number>, lower_is_better: <bool>}}, "
                                     f"got {self.describe(value)}", value, key)
                limits.append(RegressionLimit(metric, self.number(value, key, check=_non_negative,
                                                                  range_text=">= 0")))
        return tuple(limits)

    def canary(self, node: Node) -> CanaryPolicy | None:
        if isinstance(node, ScalarNode):
            value = self.scalar(node)
            if isinstance(value, bool):
                return CanaryPolicy() if value else None
            if value is None:
                return CanaryPolicy()
        items = self.mapping(node, "promotion.canary", _CANARY_KEYS)
        path = "promotion.canary"
        kwargs: dict[str, Any] = {}
        specs: dict[str, dict[str, Any]] = {
            "percent": {"check": lambda v: 0 < v < 100, "range_text": "between 0 and 100 (exclusive)"},
            "min_requests": {"integer": True, "check": lambda v: v >= 1, "range_text": ">= 1"},
            "max_minutes": {"check": lambda v: v > 0, "range_text": "> 0"},
            "max_error_rate": {"nullable": True, "check": lambda v: 0 <= v <= 1,
                               "range_text": "between 0 and 1 (a share, not a percentage)"},
            "max_p99_latency_ms": {"nullable": True, "check": lambda v: v > 0, "range_text": "> 0"},
            "quality_margin": {"nullable": True, "check": _non_negative, "range_text": ">= 0"},
            "min_labelled_rows": {"integer": True, "check": lambda v: v >= 1, "range_text": ">= 1"},
        }
        for key, spec in specs.items():
            if (sub := self.get(items, key)) is not None:
                kwargs[key] = self.number(sub, f"{path}.{key}", **spec)
        if (sub := self.get(items, "require_no_drift")) is not None:
            kwargs["require_no_drift"] = self.boolean(sub, f"{path}.require_no_drift")
        if (sub := self.get(items, "insufficient_evidence")) is not None:
            kwargs["insufficient_evidence"] = self.choice(sub, f"{path}.insufficient_evidence",
                                                          INSUFFICIENT_EVIDENCE)
        return CanaryPolicy(**kwargs)

    def drift(self, node: Node) -> DriftPolicy:
        items = self.mapping(node, "drift", _DRIFT_KEYS)
        kwargs: dict[str, Any] = {}
        if (sub := self.get(items, "consecutive_reports")) is not None:
            kwargs["consecutive_reports"] = self.number(sub, "drift.consecutive_reports", integer=True,
                                                        check=lambda v: v >= 1, range_text=">= 1")
        if (sub := self.get(items, "action")) is not None:
            kwargs["action"] = self.choice(sub, "drift.action", DRIFT_ACTIONS)
        return DriftPolicy(**kwargs)

    def quality(self, node: Node) -> QualityPolicy:
        items = self.mapping(node, "quality", _QUALITY_KEYS)
        kwargs: dict[str, Any] = {}
        if (sub := self.get(items, "figure")) is not None:
            kwargs["figure"] = self.string(sub, "quality.figure")
        for key in ("floor", "max_drop"):
            if (sub := self.get(items, key)) is not None:
                kwargs[key] = self.number(sub, f"quality.{key}", nullable=True)
        if (sub := self.get(items, "consecutive_reports")) is not None:
            kwargs["consecutive_reports"] = self.number(sub, "quality.consecutive_reports", integer=True,
                                                        check=lambda v: v >= 1, range_text=">= 1")
        if (sub := self.get(items, "action")) is not None:
            kwargs["action"] = self.choice(sub, "quality.action", DRIFT_ACTIONS)
        if kwargs.get("floor") is None and kwargs.get("max_drop") is None:
            raise self.error("needs floor or max_drop (or both): without a limit nothing can fall short of it",
                             node, "quality")
        if (sub := self.get(items, "use_estimates")) is not None:
            kwargs["use_estimates"] = self.boolean(sub, "quality.use_estimates")
            if kwargs["use_estimates"] and kwargs.get("figure", "accuracy") != "accuracy":
                raise self.error("use_estimates needs figure: accuracy (CBPE estimates accuracy with an interval; "
                                 "no other figure has one)", sub, "quality.use_estimates")
        return QualityPolicy(**kwargs)

    def notify(self, node: Node) -> NotifyPolicy:
        from mlflow_deploy_plugin.lifecycle.notify import FORMATS, parse_event_filter, parse_targets

        items = self.mapping(node, "notify", _NOTIFY_KEYS)
        if "urls" not in items:
            raise self.error("required key is missing: the receivers' URLs", node, "notify.urls")
        urls = self.strings(items["urls"][1], "notify.urls")
        fmt = self.choice(sub, "notify.format", FORMATS) if (sub := self.get(items, "format")) is not None else "json"
        events = self.strings(sub, "notify.events") if (sub := self.get(items, "events")) is not None else "all"
        try:
            parse_targets(urls, fmt)
        except ValueError as exc:
            raise self.error(f"expected http(s) URLs: {exc}", items["urls"][1], "notify.urls") from None
        try:
            parse_event_filter(events)
        except ValueError as exc:
            raise self.error(str(exc), items["events"][1], "notify.events") from None
        return NotifyPolicy(urls=urls, format=fmt, events=events)

    def strings(self, node: Node, key: str) -> str:
        """One string or a list of strings, joined with commas."""
        if isinstance(node, SequenceNode):
            return ",".join(self.string(item, f"{key}[{index}]") for index, item in enumerate(node.value))
        return self.string(node, key)

    def choice(self, node: Node, key: str, allowed: tuple[str, ...]) -> str:
        """One of ``allowed`` (case-insensitive), or an error with a "did you mean"."""
        value = self.string(node, key).lower()
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise self.error(f"must be one of {', '.join(allowed)}, got {node.value!r}{hint}", node, key)
        return value
