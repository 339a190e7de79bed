"""Signature compatibility: does a candidate accept every input the live version accepts?

Kept apart from the gates because it is a pure comparison of two MLflow input schemas (no registry,
no model loading), with rules of its own that follow MLflow's schema enforcement; the
``signature_compatible`` gate reads both signatures and asks this module.
"""

from __future__ import annotations

from typing import Any

from mlflow.types.schema import ColSpec, DataType, Schema

# Column type changes MLflow's schema enforcement performs without loss (see
# mlflow.models.utils._enforce_mlflow_datatype): live type -> candidate types that accept it.
_WIDENINGS: dict[DataType, set[DataType]] = {
    DataType.integer: {DataType.long, DataType.double},
    DataType.float: {DataType.double},
}


def _type_label(spec_type: Any) -> str:
    return spec_type.name if isinstance(spec_type, DataType) else str(spec_type)


def _accepts(live_type: Any, candidate_type: Any) -> bool:
    """Whether a column the live version accepts as ``live_type`` is accepted by the candidate."""
    if live_type == candidate_type:
        return True
    if isinstance(live_type, DataType) and isinstance(candidate_type, DataType):
        return candidate_type in _WIDENINGS.get(live_type, set())
    return False


def _col_specs(schema: Schema) -> list[ColSpec]:
    """The column specs of a schema that is not a tensor schema (MLflow never mixes the two)."""
    return [spec for spec in schema.inputs if isinstance(spec, ColSpec)]


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
    cand_specs = _col_specs(candidate)
    live_specs = _col_specs(live)
    if not candidate.has_input_names() or not live.has_input_names():
        # Unnamed columns are matched by position.
        cand_types = [_type_label(spec.type) for spec in cand_specs]
        live_types = [_type_label(spec.type) for spec in live_specs]
        ok = len(cand_specs) == len(live_specs) and all(
            _accepts(a.type, b.type) for a, b in zip(live_specs, cand_specs, strict=True))
        detail = (f"{len(cand_specs)} positional columns accept the live ones" if ok else
                  f"positional columns differ: live {live_types}, candidate {cand_types}")
        return ok, detail, {"candidate_types": cand_types, "live_types": live_types}

    # MLflow never mixes named and unnamed inputs in one schema: here every spec has a name.
    live_by_name = {spec.name: spec for spec in live_specs if spec.name is not None}
    cand_by_name = {spec.name: spec for spec in cand_specs if spec.name is not None}
    newly_required = [spec.name for spec in cand_specs if spec.name is not None and spec.required
                      and not (spec.name in live_by_name and live_by_name[spec.name].required)]
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
