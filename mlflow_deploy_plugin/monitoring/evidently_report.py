"""Render the human-facing Evidently drift report from a bounded random sample.

Verdicts come from :mod:`.drift_stats` (exact, all rows). Evidently's ``DataDriftPreset`` costs
~170 s and ~1.9 GB on 1M x 25 rows (each column is tested three times and histograms dominate), so
it only ever sees up to ``sample_rows`` rows of each frame; the report then says so on top, in a
text widget, and the returned dict carries the same note for the JSON summary.

Per-column methods are mapped to Evidently stattests of the same definition where Evidently has
one: ``ks`` -> ``ks``, ``wasserstein`` -> ``wasserstein`` (normed by reference std, same as ours),
``psi`` -> ``psi`` and ``jensenshannon`` -> ``jensenshannon`` (same formulas; Evidently bins numeric
columns by Sturges' rule on both samples where we use reference deciles, so these values can differ a
little). Evidently has no two-sample chi-square test (its ``chisquare`` is the one-sample goodness
of fit test that treats the reference as exact), so our ``chi2`` is registered in Evidently as
``chi2_homogeneity`` with the same implementation. Thresholds are passed per column, so the HTML
uses ours.

Evidently is imported lazily: it takes ~5 s to import.
"""

from __future__ import annotations

import html
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .drift_stats import DriftResult, chi2_homogeneity

_log = logging.getLogger(__name__)

#: Our method name -> Evidently stattest name.
EVIDENTLY_STATTESTS: dict[str, str] = {
    "ks": "ks",
    "chi2": "chi2_homogeneity",
    "psi": "psi",
    "wasserstein": "wasserstein",
    "jensenshannon": "jensenshannon",
}
DEFAULT_SAMPLE_ROWS = 20_000
_BANNER_MARKER = "mlflow-deploy-plugin-sample-banner"
_SAMPLE_PHRASE = "the Evidently HTML is rendered from a random sample"
_registered = False
_preset_class: type | None = None


def _register_chi2_homogeneity() -> None:
    """Register our two-sample chi-square test of homogeneity as Evidently stattest (idempotent)."""
    global _registered
    if _registered:
        return
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    def _chi2_homogeneity_stattest(reference_data: pd.Series, current_data: pd.Series, feature_type: Any,
                                   threshold: float) -> tuple[float, bool]:
        ref_vc = reference_data.value_counts(dropna=True, sort=False)
        cur_vc = current_data.value_counts(dropna=True, sort=False)
        keys = ref_vc.index.append(cur_vc.index).unique()
        _, p_value, _ = chi2_homogeneity(ref_vc.reindex(keys, fill_value=0).to_numpy(np.float64),
                                          cur_vc.reindex(keys, fill_value=0).to_numpy(np.float64))
        return p_value, p_value < threshold

    stat_test = StatTest(
        name=EVIDENTLY_STATTESTS["chi2"],
        display_name="chi-square homogeneity p_value (two-sample)",
        allowed_feature_types=[ColumnType.Categorical],
        default_threshold=0.05,
    )
    register_stattest(stat_test, default_impl=_chi2_homogeneity_stattest)
    _registered = True


def _sample(frame: pd.DataFrame, names: list[str], rows: int, seed: int) -> tuple[pd.DataFrame, bool]:
    """``rows`` random rows of ``frame[names]`` (all if fewer), drawn before selecting columns so a
    1M-row frame is never copied whole."""
    if len(frame) <= rows:
        return frame[names], False
    positions = np.sort(np.random.default_rng(seed).choice(len(frame), size=rows, replace=False))
    return frame.iloc[positions][names].reset_index(drop=True), True


def _verdict_markdown(result: DriftResult) -> str:
    drifted = ", ".join(f"`{name}`" for name in result.drifted_columns) or "none"
    return (f"**Exact verdicts (mlflow-deploy-plugin, all rows: {result.n_reference:,} reference, "
            f"{result.n_current:,} current):** {result.n_drifted} of {result.n_tested} columns drifted "
            f"(share {result.drift_share:.3f}, dataset drift at >= {result.drift_share_threshold:g}: "
            f"{'**yes**' if result.dataset_drifted else 'no'}). Drifted: {drifted}.")


def render_evidently_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    result: DriftResult,
    html_path: str | Path,
    *,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
) -> dict[str, Any]:
    """Build an Evidently 0.7 ``DataDriftPreset`` report and save it as self-contained HTML.

    Only the columns tested in ``result`` are included, typed as ``result`` typed them (numerical or
    categorical) and tested with the matching Evidently stattest and our thresholds. Frames longer
    than ``sample_rows`` are replaced by a seeded random sample of that many rows.

    Returns:
        ``{"rendered_from_sample", "sample_rows_reference", "sample_rows_current", "note"}`` for the
        JSON summary (``sample_rows_*`` are the rows Evidently saw).
    """
    if sample_rows < 1:
        raise ValueError(f"sample_rows must be >= 1, got {sample_rows!r}.")
    tested = [col for col in result.columns if col.skipped_reason is None and col.kind is not None]
    if not tested:
        raise ValueError("no tested column to render: every column was skipped.")
    names = [col.name for col in tested]
    ref_sample, ref_sampled = _sample(reference, names, sample_rows, seed)
    cur_sample, cur_sampled = _sample(current, names, sample_rows, seed + 1)
    sampled = ref_sampled or cur_sampled
    if sampled:
        note = ("verdicts computed exactly on all rows by mlflow-deploy-plugin; the Evidently HTML is "
                f"rendered from a random sample of {len(ref_sample):,} reference rows (of "
                f"{len(reference):,}) and {len(cur_sample):,} current rows (of {len(current):,})")
    else:
        note = ("verdicts computed exactly on all rows by mlflow-deploy-plugin; the Evidently HTML is "
                f"rendered from the same rows ({len(reference):,} reference, {len(current):,} current)")

    banner = f"{'**Sampled report.** ' if sampled else ''}{note[0].upper()}{note[1:]}. {_verdict_markdown(result)}"
    path = str(html_path)  # Evidently's save_html writes only when given a str
    with warnings.catch_warnings():
        # Evidently and its plotting stack are noisy (FutureWarning/DeprecationWarning) on pandas 2.x.
        warnings.simplefilter("ignore")
        _build_and_save(ref_sample, cur_sample, result, tested, banner, path)
    _ensure_banner(path, note, sampled)
    return {
        "rendered_from_sample": sampled,
        "sample_rows_reference": len(ref_sample),
        "sample_rows_current": len(cur_sample),
        "note": note,
    }


def _annotated_preset_class() -> type:
    """DataDriftPreset with a text widget on top saying where the verdicts come from (built once)."""
    global _preset_class
    if _preset_class is not None:
        return _preset_class
    from evidently.legacy.renderers.html_widgets import text_widget
    from evidently.presets import DataDriftPreset

    class AnnotatedDataDriftPreset(DataDriftPreset):
        banner: str = ""

        def __init__(self, banner: str, **kwargs: Any) -> None:
            self.banner = banner  # pydantic model: set before the base __init__ freezes it
            super().__init__(**kwargs)

        def render(self, context: Any, child_widgets: Any = None) -> list:
            return [text_widget(text=self.banner, title="About this report")] + super().render(
                context, child_widgets)

    _preset_class = AnnotatedDataDriftPreset
    return _preset_class


def _build_and_save(ref_sample: pd.DataFrame, cur_sample: pd.DataFrame, result: DriftResult,
                    tested: list, banner: str, path: str) -> None:
    from evidently import DataDefinition, Dataset, Report

    _register_chi2_homogeneity()
    preset_class = _annotated_preset_class()
    definition = DataDefinition(
        numerical_columns=[col.name for col in tested if col.kind == "numeric"],
        categorical_columns=[col.name for col in tested if col.kind == "categorical"],
    )
    preset = preset_class(
        banner,
        columns=[col.name for col in tested],
        drift_share=result.drift_share_threshold,
        per_column_method={col.name: EVIDENTLY_STATTESTS[col.method] for col in tested},
        per_column_threshold={col.name: float(col.threshold) for col in tested},
    )
    report = Report([preset], include_tests=True)
    snapshot = report.run(Dataset.from_pandas(cur_sample, data_definition=definition),
                          Dataset.from_pandas(ref_sample, data_definition=definition))
    snapshot.save_html(path)


def _ensure_banner(path: str, note: str, sampled: bool) -> None:
    """Inject a visible banner if the text widget did not make it into the HTML (future Evidently)."""
    text = Path(path).read_text(encoding="utf-8")
    if not sampled or _SAMPLE_PHRASE in text:
        return
    _log.warning("Evidently HTML lacks the sampling note widget; injecting a banner instead.")
    div = (f'<div id="{_BANNER_MARKER}" style="padding:8px 16px;background:#fff3cd;border-bottom:1px solid '
           f'#e0c060;font-family:sans-serif">{html.escape(note[0].upper() + note[1:])}.</div>')
    lower = text.lower()
    start = lower.find("<body")
    end = lower.find(">", start) + 1 if start >= 0 else 0
    Path(path).write_text(text[:end] + div + text[end:], encoding="utf-8")


def render_fallback_html(result: DriftResult, html_path: str | Path, error: str) -> None:
    """A plain HTML table of the exact verdicts, written when Evidently fails to render.

    The verdicts do not depend on Evidently, so its failure should not lose them.
    """
    rows = "".join(
        f"<tr><td>{html.escape(c.name)}</td><td>{c.kind}</td><td>{c.method}</td><td>{c.threshold:g}</td>"
        f"<td>{'' if c.score is None else f'{c.score:.4g}'}</td><td>{'yes' if c.drifted else 'no'}</td>"
        f"<td>{html.escape(c.skipped_reason or '')}</td></tr>"
        for c in result.columns
    )
    Path(html_path).write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Drift report</title></head><body>"
        f"<h2>Drift report (Evidently failed to render: {html.escape(error)})</h2>"
        f"<p>{result.n_drifted} of {result.n_tested} columns drifted (share {result.drift_share:.3f}).</p>"
        "<table border='1' cellpadding='4'><tr><th>column</th><th>kind</th><th>method</th><th>threshold</th>"
        f"<th>score</th><th>drifted</th><th>skipped</th></tr>{rows}</table></body></html>",
        encoding="utf-8",
    )
