"""Promotion gates and canary judgement: may this candidate version replace the champion?

``evaluate_gates`` runs every gate a policy turns on against one candidate version, and keeps going
after a failure, so one report says everything that stands in the way. Each result says *by how
much* a gate failed, because "accuracy gate failed" sends someone digging while "short by 0.029"
does not. ``evaluate_canary`` turns live figures of a challenger into pending / pass / fail.

Gate names in reports: ``metric[<expression>]``, ``max_regression[<metric>]``,
``signature_compatible``, ``smoke_test``; canary checks are ``canary.evidence``,
``canary.error_rate``, ``canary.p99_latency`` and ``canary.drift``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import mlflow.models
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.types.schema import ColSpec, DataType, Schema

from mlflow_deploy_plugin.lifecycle.policy import CanaryPolicy, MetricThreshold, Policy, RegressionLimit
from mlflow_deploy_plugin.serving.model_slot import ModelIdentity, ModelSlot

# Floating-point slack when comparing figures read back from the store (0.9 - 0.89 is not 0.01).
_EPS = 1e-9

# Column type changes MLflow's schema enforcement performs without loss (see
# mlflow.models.utils._enforce_mlflow_datatype): live type -> candidate types that accept it.
_WIDENINGS: dict[DataType, set[DataType]] = {
    DataType.integer: {DataType.long, DataType.double},
    DataType.float: {DataType.double},
}


class ModelVersionLike(Protocol):
    """Anything with a registered model ``name`` and ``version`` (e.g. mlflow's ModelVersion)."""

    name: str
    version: str | int


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate. ``figures`` holds the numbers behind ``detail`` for audit records."""

    gate: str
    passed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False  # the policy turned this gate off; kept so records show it was not run

    def line(self, label: str | None = None) -> str:
        """One line: ``FAIL metric[accuracy >= 0.9]: ...``."""
        label = label or ("SKIP" if self.skipped else "PASS" if self.passed else "FAIL")
        return f"{label} {self.gate}: {self.detail}"


@dataclass(frozen=True)
class GateReport:
    """All gate results of one candidate; ``passed`` only when every gate passed (or was skipped)."""

    passed: bool
    results: list[GateResult]

    @property
    def failures(self) -> list[GateResult]:
        """The gates that failed."""
        return [result for result in self.results if not result.passed]

    def summary(self) -> str:
        """A verdict line, then one line per gate saying what failed and by how much."""
        if not self.results:
            return "gates passed: no gates configured"
        failed = self.failures
        head = (f"gates passed ({len(self.results)})" if not failed else
                f"gates failed: {len(failed)} of {len(self.results)} "
                f"({', '.join(result.gate for result in failed)})")
        return "\n".join([head, *(result.line() for result in self.results)])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for audit records and tags."""
        return {"passed": self.passed, "results": [asdict(result) for result in self.results]}


@dataclass(frozen=True)
class CanaryStats:
    """What the serving side measured for the challenger since the canary started."""

    requests: int
    errors: int  # 5xx answers (client mistakes, 4xx, are not the challenger's fault)
    p99_latency_ms: float | None
    elapsed_s: float
    drift_status: str | None = None  # the challenger's latest ``drift.status`` tag, if any


@dataclass(frozen=True)
class CanaryVerdict:
    """``pending`` (keep waiting), ``pass`` (promote) or ``fail`` (roll the challenger back)."""

    status: Literal["pending", "pass", "fail"]
    results: list[GateResult]
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True only for a final pass."""
        return self.status == "pass"

    @property
    def pending(self) -> bool:
        """True while there is not enough evidence to judge."""
        return self.status == "pending"

    def summary(self) -> str:
        """A verdict line, then one line per check."""
        failed = [result.gate for result in self.results if not result.passed]
        head = f"canary {self.status}" + (f": {', '.join(failed)}" if self.status == "fail" else "")
        lines = [result.line("WAIT" if self.pending and not result.passed else None) for result in self.results]
        return "\n".join([head, *lines])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for audit records and tags."""
        return {"status": self.status, "figures": self.figures,
                "results": [asdict(result) for result in self.results]}


def _fmt(value: float) -> str:
    """Figures people read: 6 significant digits, float noise (0.029000000000000026) rounded off."""
    return f"{round(value, 12):.6g}"


# --- promotion gates -------------------------------------------------------------------------------


def evaluate_gates(policy: Policy, candidate: ModelVersionLike | tuple[str, str | int], *,
                   client: MlflowClient, champion_version: str | None, cache_dir: Path) -> GateReport:
    """Run every gate ``policy`` turns on against ``candidate`` and report all of them.

    ``candidate`` is a ModelVersion (or any object with ``name`` and ``version``, or a
    ``(name, version)`` tuple) of ``policy.model``. ``champion_version`` is the live version to
    compare with, or None when there is none yet (then regression and signature gates pass: there
    is nothing to regress from or to stay compatible with). The smoke gate downloads the candidate
    under ``cache_dir/<name>/<version>`` (the serving workers' layout, so a deployment's models
    folder can be passed to reuse the copy). The signature and smoke gates read the registry through
    MLflow's global tracking/registry URI, which must be the store ``client`` talks to.

    Gates never raise for a bad candidate: they fail with a detail. Errors reading the registry
    itself (the candidate version does not exist) propagate.
    """
    name, version = (candidate if isinstance(candidate, tuple) else (candidate.name, candidate.version))
    version = str(version)
    if name != policy.model:
        raise ValueError(f"candidate {name!r} v{version} is not the policy's model {policy.model!r}")
    candidate_mv = client.get_model_version(name, version)
    runs = _RunCache(client)
    gates = policy.promotion.gates
    results: list[GateResult] = []

    candidate_run = runs.of_version(name, version, candidate_mv.run_id)
    for threshold in gates.metrics:
        results.append(_metric_gate(threshold, version, candidate_run))

    champion_run: Run | str | None = None
    if gates.max_regression and champion_version is not None:
        champion_mv = client.get_model_version(name, str(champion_version))
        champion_run = runs.of_version(name, str(champion_version), champion_mv.run_id)
    for limit in gates.max_regression:
        results.append(_regression_gate(limit, version, candidate_run, champion_version, champion_run))

    if gates.signature_compatible:
        results.append(_signature_gate(name, version, champion_version))
    else:
        results.append(GateResult("signature_compatible", True, "skipped: turned off in the policy", skipped=True))

    if gates.smoke_test:
        results.append(_smoke_gate(name, version, candidate_mv.run_id, cache_dir))
    else:
        results.append(GateResult("smoke_test", True, "skipped: turned off in the policy", skipped=True))

    return GateReport(passed=all(result.passed for result in results), results=results)


class _RunCache:
    """Source runs by version, read once; a run that cannot be read becomes a message for the gates."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.runs: dict[str, Run | str] = {}

    def of_version(self, name: str, version: str, run_id: str | None) -> Run | str:
        if not run_id:
            return f"v{version} has no source run (registered from outside a run), so it has no metrics"
        if run_id not in self.runs:
            try:
                self.runs[run_id] = self.client.get_run(run_id)
            except MlflowException as exc:
                self.runs[run_id] = f"source run {run_id} of v{version} could not be read: {exc.message}"
        return self.runs[run_id]


def _metric_value(run: Run | str, metric: str, who: str) -> tuple[float | None, str]:
    """The metric's value, or None and why it is not there."""
    if isinstance(run, str):
        return None, run
    metrics = run.data.metrics
    if metric not in metrics:
        known = ", ".join(sorted(metrics)[:10]) or "none"
        return None, f"{who} source run {run.info.run_id} has no metric {metric!r} (it has: {known})"
    value = float(metrics[metric])
    if math.isnan(value):
        return None, f"{who} metric {metric!r} is NaN"
    return value, ""


def _metric_gate(threshold: MetricThreshold, version: str, run: Run | str) -> GateResult:
    gate = f"metric[{threshold.expression}]"
    value, why = _metric_value(run, threshold.metric, f"candidate v{version}")
    if value is None:
        return GateResult(gate, False, why, {"metric": threshold.metric, "value": None})
    figures: dict[str, Any] = {"metric": threshold.metric, "value": value, "op": threshold.op,
                               "threshold": threshold.threshold}
    gap = abs(value - threshold.threshold)
    if threshold.holds(value):
        figures["headroom"] = gap
        margin = "" if threshold.op == "==" else f" (margin {_fmt(gap)})"
        return GateResult(gate, True, f"metric {threshold.metric} = {_fmt(value)} {threshold.op} "
                                      f"{_fmt(threshold.threshold)}{margin}", figures)
    figures["shortfall"] = gap
    if threshold.op in (">=", ">"):
        how = f"short by {_fmt(gap)}" if gap > _EPS else f"must exceed {_fmt(threshold.threshold)}"
    elif threshold.op in ("<=", "<"):
        how = f"over by {_fmt(gap)}" if gap > _EPS else f"must stay below {_fmt(threshold.threshold)}"
    else:
        how = f"off by {_fmt(gap)}"
    return GateResult(gate, False, f"metric {threshold.metric} = {_fmt(value)}, but {threshold.op} "
                                   f"{_fmt(threshold.threshold)} required ({how})", figures)


def _regression_gate(limit: RegressionLimit, version: str, candidate_run: Run | str,
                     champion_version: str | None, champion_run: Run | str | None) -> GateResult:
    gate = f"max_regression[{limit.metric}]"
    direction = "lower is better" if limit.lower_is_better else "higher is better"
    figures: dict[str, Any] = {"metric": limit.metric, "margin": limit.margin,
                               "lower_is_better": limit.lower_is_better, "champion_version": champion_version}
    candidate, why = _metric_value(candidate_run, limit.metric, f"candidate v{version}")
    if candidate is None:
        return GateResult(gate, False, why, figures)
    figures["candidate"] = candidate
    if champion_version is None or champion_run is None:
        return GateResult(gate, True, "no champion yet: nothing to regress from", figures)
    champion, why = _metric_value(champion_run, limit.metric, f"champion v{champion_version}")
    if champion is None:
        # A champion without the metric (e.g. registered by hand) must not block every successor
        # forever; say plainly that the comparison could not be made.
        return GateResult(gate, True, f"not compared: {why}", figures)
    figures["champion"] = champion
    # Positive = worse than the champion, in the metric's own direction.
    regression = candidate - champion if limit.lower_is_better else champion - candidate
    figures["regression"] = regression
    change = f"vs champion v{champion_version} ({_fmt(champion)} -> {_fmt(candidate)})"
    if regression > limit.margin + _EPS:
        figures["excess"] = regression - limit.margin
        return GateResult(gate, False, f"{limit.metric} regressed by {_fmt(regression)} {change}, margin "
                                       f"{_fmt(limit.margin)} (exceeded by {_fmt(regression - limit.margin)}; "
                                       f"{direction})", figures)
    if regression > _EPS:
        return GateResult(gate, True, f"{limit.metric} regressed by {_fmt(regression)} {change}, within margin "
                                      f"{_fmt(limit.margin)}", figures)
    moved = "improved by " + _fmt(-regression) if regression < -_EPS else "unchanged"
    return GateResult(gate, True, f"{limit.metric} {moved} {change}", figures)


def _signature_gate(name: str, version: str, champion_version: str | None) -> GateResult:
    gate = "signature_compatible"
    if champion_version is None:
        return GateResult(gate, True, "no champion yet: nothing to stay compatible with")
    schemas: dict[str, Schema | None] = {}
    for who, ver in (("candidate", version), ("champion", str(champion_version))):
        try:
            signature = mlflow.models.get_model_info(f"models:/{name}/{ver}").signature
        except Exception as exc:  # any failure to read the MLmodel is a failed gate, not a crash
            return GateResult(gate, False, f"could not read the signature of {who} v{ver}: "
                                           f"{type(exc).__name__}: {exc}", {"champion_version": champion_version})
        if signature is None or signature.inputs is None:
            return GateResult(gate, False, f"{who} v{ver} has no input signature, so compatibility cannot be "
                                           "checked (log the model with a signature, or turn "
                                           "signature_compatible off)", {"champion_version": champion_version})
        schemas[who] = signature.inputs
    ok, detail, figures = compare_input_schemas(schemas["candidate"], schemas["champion"])
    figures["champion_version"] = champion_version
    return GateResult(gate, ok, f"candidate v{version} vs champion v{champion_version}: {detail}", figures)


def _type_label(spec_type: Any) -> str:
    return spec_type.name if isinstance(spec_type, DataType) else str(spec_type)


def _accepts(live_type: Any, candidate_type: Any) -> bool:
    """Whether a column the live version accepts as ``live_type`` is accepted by the candidate."""
    if live_type == candidate_type:
        return True
    if isinstance(live_type, DataType) and isinstance(candidate_type, DataType):
        return candidate_type in _WIDENINGS.get(live_type, set())
    return False


def _list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def compare_input_schemas(candidate: Schema, live: Schema) -> tuple[bool, str, dict[str, Any]]:
    """Does ``candidate`` accept every input ``live`` accepts? Returns (ok, detail, figures).

    Requests the live version accepts carry its required columns and maybe its optional ones. So
    the candidate may not require a column the live version does not require, and every column both
    know must keep a type the candidate accepts (same, or a lossless widening MLflow performs, such
    as integer -> long/double). Live columns the candidate does not know are dropped by pyfunc's
    schema enforcement, so they are reported but do not fail the gate.
    """
    if candidate.is_tensor_spec() or live.is_tensor_spec():
        if candidate.to_dict() == live.to_dict():
            return True, "identical tensor signatures", {}
        return False, "tensor signatures differ (tensor inputs must match exactly)", {
            "candidate": candidate.to_dict(), "live": live.to_dict()}
    cand_specs: list[ColSpec] = list(candidate.inputs)
    live_specs: list[ColSpec] = list(live.inputs)
    if not candidate.has_input_names() or not live.has_input_names():
        # Unnamed columns are matched by position.
        cand_types = [_type_label(spec.type) for spec in cand_specs]
        live_types = [_type_label(spec.type) for spec in live_specs]
        ok = len(cand_specs) == len(live_specs) and all(
            _accepts(a.type, b.type) for a, b in zip(live_specs, cand_specs, strict=True))
        detail = (f"{len(cand_specs)} positional columns accept the live ones" if ok else
                  f"positional columns differ: live {live_types}, candidate {cand_types}")
        return ok, detail, {"candidate_types": cand_types, "live_types": live_types}

    live_by_name = {spec.name: spec for spec in live_specs}
    cand_by_name = {spec.name: spec for spec in cand_specs}
    newly_required = [spec.name for spec in cand_specs
                      if spec.required and not (spec.name in live_by_name and live_by_name[spec.name].required)]
    mismatches = {name: [_type_label(live_by_name[name].type), _type_label(spec.type)]
                  for name, spec in cand_by_name.items()
                  if name in live_by_name and not _accepts(live_by_name[name].type, spec.type)}
    ignored = [name for name in live_by_name if name not in cand_by_name]
    figures: dict[str, Any] = {"newly_required": newly_required, "type_mismatches": mismatches,
                               "ignored_live_columns": ignored}
    problems = []
    if newly_required:
        problems.append(f"requires {len(newly_required)} column(s) the live version does not: "
                        f"{_list(newly_required)}")
    if mismatches:
        problems.append("incompatible types: " + _list(
            [f"{name} (live {live_t}, candidate {cand_t})" for name, (live_t, cand_t) in mismatches.items()]))
    if problems:
        return False, "; ".join(problems), figures
    detail = f"accepts all {len(live_by_name)} live columns"
    if ignored:
        detail = f"accepts the live inputs; ignores {len(ignored)} live column(s): {_list(ignored)}"
    return True, detail, figures


def _smoke_gate(name: str, version: str, run_id: str | None, cache_dir: Path) -> GateResult:
    uri = f"models:/{name}/{version}"
    identity = ModelIdentity(model_name=name, model_version=version, model_uri=uri, requested_uri=uri,
                             run_id=run_id)
    try:
        slot = ModelSlot.load(identity, Path(cache_dir) / name / version)
        checked = slot.smoke_test()
    except Exception as exc:  # ModelLoadError or anything the model's own code raises
        return GateResult("smoke_test", False, str(exc), {"error": type(exc).__name__})
    return GateResult("smoke_test", True, f"v{version}: {checked}")


# --- canary --------------------------------------------------------------------------------------


def evaluate_canary(canary: CanaryPolicy, stats: CanaryStats) -> CanaryVerdict:
    """Judge a running canary: ``pending`` until ``min_requests`` or ``max_minutes`` is reached, then
    ``pass`` or ``fail``.

    Fails early, before the judging point, only when the outcome is already certain: the errors
    seen exceed the error budget of the ``min_requests`` window (``max_error_rate * min_requests``),
    or the challenger is reported drifted while ``require_no_drift`` is on. At ``max_minutes`` with
    fewer than ``min_requests`` requests, what there is gets judged; no traffic at all fails.
    """
    if stats.requests < 0 or stats.errors < 0 or stats.errors > stats.requests or stats.elapsed_s < 0:
        raise ValueError(f"inconsistent canary stats: {stats}")
    limit_s = canary.max_minutes * 60
    minutes = stats.elapsed_s / 60
    error_rate = stats.errors / stats.requests if stats.requests else None
    figures: dict[str, Any] = {"requests": stats.requests, "errors": stats.errors, "error_rate": error_rate,
                               "p99_latency_ms": stats.p99_latency_ms, "elapsed_s": stats.elapsed_s,
                               "drift_status": stats.drift_status, "min_requests": canary.min_requests,
                               "max_minutes": canary.max_minutes}
    progress = (f"{stats.requests} of {canary.min_requests} requests, {_fmt(minutes)} of "
                f"{_fmt(canary.max_minutes)} minutes")
    enough = stats.requests >= canary.min_requests
    timed_out = stats.elapsed_s >= limit_s

    drift = _canary_drift(canary, stats)
    if not (enough or timed_out):
        certain = [result for result in (drift, _early_error_check(canary, stats)) if result and not result.passed]
        if certain:
            return CanaryVerdict("fail", certain, figures)
        waiting = GateResult("canary.evidence", False, f"waiting for evidence: {progress}",
                             {"requests": stats.requests, "elapsed_s": stats.elapsed_s})
        return CanaryVerdict("pending", [waiting], figures)

    if stats.requests == 0:
        results = [GateResult("canary.evidence", False, f"no request reached the challenger in "
                                                        f"{_fmt(minutes)} minutes", {"requests": 0})]
        return CanaryVerdict("fail", results + ([drift] if drift else []), figures)

    why = "min_requests reached" if enough else (
        f"max_minutes reached with only {stats.requests} of {canary.min_requests} requests")
    results = [GateResult("canary.evidence", True, f"judged on {stats.requests} requests after "
                                                   f"{_fmt(minutes)} minutes ({why})",
                          {"requests": stats.requests, "elapsed_s": stats.elapsed_s})]
    if canary.max_error_rate is not None:
        assert error_rate is not None
        over = error_rate - canary.max_error_rate
        text = (f"error rate {_pct(error_rate)} ({stats.errors} of {stats.requests})")
        results.append(GateResult(
            "canary.error_rate", over <= _EPS,
            f"{text} > {_pct(canary.max_error_rate)} allowed (over by {_fmt(over * 100)} points)" if over > _EPS
            else f"{text} <= {_pct(canary.max_error_rate)} allowed",
            {"error_rate": error_rate, "max_error_rate": canary.max_error_rate}))
    if canary.max_p99_latency_ms is not None:
        p99 = stats.p99_latency_ms
        if p99 is None:
            results.append(GateResult("canary.p99_latency", False, "no p99 latency figure for the challenger",
                                      {"max_p99_latency_ms": canary.max_p99_latency_ms}))
        else:
            over = p99 - canary.max_p99_latency_ms
            results.append(GateResult(
                "canary.p99_latency", over <= _EPS,
                f"p99 latency {_fmt(p99)} ms > {_fmt(canary.max_p99_latency_ms)} ms allowed (over by "
                f"{_fmt(over)} ms)" if over > _EPS
                else f"p99 latency {_fmt(p99)} ms <= {_fmt(canary.max_p99_latency_ms)} ms allowed",
                {"p99_latency_ms": p99, "max_p99_latency_ms": canary.max_p99_latency_ms}))
    if drift:
        results.append(drift)
    status: Literal["pass", "fail"] = "pass" if all(result.passed for result in results) else "fail"
    return CanaryVerdict(status, results, figures)


def _pct(share: float) -> str:
    return f"{_fmt(share * 100)}%"


def _canary_drift(canary: CanaryPolicy, stats: CanaryStats) -> GateResult | None:
    if not canary.require_no_drift:
        return None
    if stats.drift_status is None:
        return GateResult("canary.drift", True, "no drift report for the challenger yet", {"drift_status": None})
    drifted = stats.drift_status.lower() == "drifted"
    return GateResult("canary.drift", not drifted, f"challenger drift status is {stats.drift_status!r}",
                      {"drift_status": stats.drift_status})


def _early_error_check(canary: CanaryPolicy, stats: CanaryStats) -> GateResult | None:
    if canary.max_error_rate is None:
        return None
    budget = canary.max_error_rate * canary.min_requests
    if stats.errors <= budget + _EPS:
        return None
    return GateResult(
        "canary.error_rate", False,
        f"{stats.errors} errors in {stats.requests} requests already exceed the error budget of the "
        f"{canary.min_requests}-request window ({_fmt(budget)} = {_pct(canary.max_error_rate)}): failing early",
        {"errors": stats.errors, "budget": budget, "max_error_rate": canary.max_error_rate})


# --- registry roles ------------------------------------------------------------------------------


def role_version(policy: Policy, role: Literal["champion", "challenger"], client: MlflowClient) -> str | None:
    """The version currently holding ``role`` (alias or stage, per the policy), or None if none does.

    With several versions in one stage, the highest version number counts (what
    ``models:/name/<stage>`` resolves to).
    """
    ref = policy.champion if role == "champion" else policy.challenger
    if policy.registry == "alias":
        try:
            return str(client.get_model_version_by_alias(policy.model, ref).version)
        except MlflowException as exc:
            # A missing alias answers INVALID_PARAMETER_VALUE; a missing model (RESOURCE_DOES_NOT_EXIST)
            # is a policy naming the wrong model and must surface.
            if exc.error_code == "INVALID_PARAMETER_VALUE":
                return None
            raise
    with warnings.catch_warnings():
        # Stages are deprecated (FutureWarning) but still supported by this plugin on purpose.
        warnings.simplefilter("ignore", FutureWarning)
        versions = client.get_latest_versions(policy.model, stages=[ref])
    return str(max(int(mv.version) for mv in versions)) if versions else None
