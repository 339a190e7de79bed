"""Promotion gates: may this candidate version replace the champion?

``evaluate_gates`` runs every gate a policy turns on against one candidate version, and keeps going
after a failure, so one report says everything that stands in the way. Each result says *by how
much* a gate failed, because "accuracy gate failed" sends someone digging while "short by 0.029"
does not. The canary that may follow is judged by :mod:`.canary`; the signature comparison behind
``signature_compatible`` lives in :mod:`.schema_compat`.

Gate names in reports: ``metric[<expression>]``, ``max_regression[<metric>]``,
``signature_compatible``, ``smoke_test``.
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
from mlflow.types.schema import Schema

from mlflow_deploy_plugin.lifecycle.policy import MetricThreshold, Policy, RegressionLimit
from mlflow_deploy_plugin.lifecycle.schema_compat import compare_input_schemas
from mlflow_deploy_plugin.registry import is_transient
from mlflow_deploy_plugin.serving.model_slot import ModelIdentity, ModelSlot

# Floating-point slack when comparing figures read back from the store (0.9 - 0.89 is not 0.01).
_EPS = 1e-9


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
class StageVerdict:
    """The verdict of a stage judged on live evidence (shadow, canary): ``pending`` (keep
    gathering), ``pass`` (on to the next step) or ``fail`` (reject the challenger)."""

    stage = "stage"  # the name on the verdict line; each stage's subclass sets its own

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
        head = f"{self.stage} {self.status}" + (f": {', '.join(failed)}" if self.status == "fail" else "")
        lines = [result.line("WAIT" if self.pending and not result.passed else None) for result in self.results]
        return "\n".join([head, *lines])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for audit records and tags."""
        return {"status": self.status, "figures": self.figures,
                "results": [asdict(result) for result in self.results]}


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
    itself (the candidate version does not exist) propagate, and so does any transient registry or
    network error (:func:`..registry.is_transient`) met by any gate: a registry that did not answer
    says nothing about the candidate, so it must never fail (and block) it.
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
        results.append(_regression_gate(limit, version, candidate_run, champion_version, champion_run,
                                        allow_missing=gates.allow_missing_champion_metrics))

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
                if is_transient(exc):
                    raise
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
                     champion_version: str | None, champion_run: Run | str | None,
                     allow_missing: bool = False) -> GateResult:
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
        # Fail closed: "no worse than the champion" cannot be vouched for. A champion registered by
        # hand without the metric would block every successor: the policy can allow that explicitly.
        if allow_missing:
            return GateResult(gate, True, f"not compared: {why} (allow_missing_champion_metrics)", figures)
        return GateResult(gate, False, f"cannot compare: {why}; set promotion.gates."
                                       "allow_missing_champion_metrics: true to promote without it", figures)
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
    schemas: dict[str, Schema] = {}
    for who, ver in (("candidate", version), ("champion", str(champion_version))):
        try:
            signature = mlflow.models.get_model_info(f"models:/{name}/{ver}").signature
        except Exception as exc:  # any failure to read the MLmodel is a failed gate, not a crash
            if is_transient(exc):
                raise
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


def _smoke_gate(name: str, version: str, run_id: str | None, cache_dir: Path) -> GateResult:
    uri = f"models:/{name}/{version}"
    identity = ModelIdentity(model_name=name, model_version=version, model_uri=uri, requested_uri=uri,
                             run_id=run_id)
    try:
        slot = ModelSlot.load(identity, Path(cache_dir) / name / version)
        checked = slot.smoke_test()
    except Exception as exc:  # ModelLoadError or anything the model's own code raises
        if is_transient(exc):  # the download did not get through: no verdict on the model
            raise
        return GateResult("smoke_test", False, str(exc), {"error": type(exc).__name__})
    return GateResult("smoke_test", True, f"v{version}: {checked}")


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
