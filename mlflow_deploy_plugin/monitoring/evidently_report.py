"""Render the human-facing Evidently drift report; it shows our verdicts, never verdicts of its own.

Verdicts come from :mod:`.drift_stats` (exact, all rows). Evidently draws the distributions; it must
never judge, or its page could contradict the run's metrics and the version tags. So:

* each plotted column gets its own Evidently stattest, registered for this render only, that
  returns *our* verdict for that column (drifted or not) and *our* effect size as its "drift score";
  its display name (the table's "Stat Test" cell) is our verdict in words: test p-value vs level,
  effect size vs floor, missing-value rates. Evidently's own tests never run;
* the page's headline (dataset drift, columns judged, drifted, share) and a table of every column's
  exact figures are ours, built from the :class:`.drift_stats.DriftResult`; this table also lists what
  Evidently cannot plot (columns absent or entirely missing in the current data, columns only the
  current data has, skipped columns);
* ``DataDriftPreset``'s per-column table keeps its histograms; its title is ours.

Evidently's ``DataDriftPreset`` costs ~170 s and ~1.9 GB on 1M x 25 rows (histograms dominate), so
it only ever sees up to ``sample_rows`` rows of each frame. A sampled page says so on every widget
the sample affects (the distributions table's title, its histogram column headers and each row's
distribution plots) and in the text on top; the exact widgets say they are exact.

Evidently is imported lazily: it takes ~5 s to import.
"""

from __future__ import annotations

import html
import logging
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlflow_deploy_plugin.capture.columns import ParquetColumns

from .drift_methods import LABELS
from .drift_stats import ColumnDrift, DriftResult, Frame

_log = logging.getLogger(__name__)

DEFAULT_SAMPLE_ROWS = 20_000
_BANNER_MARKER = "mlflow-deploy-plugin-sample-banner"
_SAMPLE_PHRASE = "the Evidently HTML is rendered from a random sample"
#: Marks the stattests of one render (``<prefix>_<render id>_<column index>``).
STATTEST_PREFIX = "mlflow_deploy_verdict"
_preset_class: type | None = None


def _sample(frame: Frame, names: list[str], rows: int, seed: int) -> tuple[pd.DataFrame, bool]:
    """``rows`` random rows of ``frame[names]`` (all if fewer), drawn before selecting columns so a
    1M-row frame is never copied whole. A table read from disk gives the rows it kept while its
    columns were read (the same draw: :func:`mlflow_deploy_plugin.capture.columns.sample_positions`)."""
    if isinstance(frame, ParquetColumns):
        return frame.sample(names, rows, seed)
    if len(frame) <= rows:
        return frame[names], False
    positions = np.sort(np.random.default_rng(seed).choice(len(frame), size=rows, replace=False))
    return frame.iloc[positions][names].reset_index(drop=True), True


def _as_judged(sample: pd.DataFrame, columns: list[ColumnDrift]) -> pd.DataFrame:
    """Numeric columns that arrived as text (e.g. captured JSON) as numbers, as the verdicts read them
    (unparsable values become missing); Evidently refuses non-numeric values in a numerical column."""
    convert = {col.name: pd.to_numeric(sample[col.name], errors="coerce") for col in columns
               if col.kind == "numeric" and not pd.api.types.is_numeric_dtype(sample[col.name].dtype)
               and not pd.api.types.is_datetime64_any_dtype(sample[col.name].dtype)}
    return sample.assign(**convert) if convert else sample


def _plottable(sample: pd.Series) -> bool:
    """Whether Evidently can draw the column: it refuses a column without any finite value."""
    if pd.api.types.is_numeric_dtype(sample.dtype) and not pd.api.types.is_bool_dtype(sample.dtype):
        return bool(np.isfinite(sample.to_numpy(dtype=np.float64, na_value=np.nan)).any())
    return bool(sample.notna().any())


def _figure(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _verdict_word(col: ColumnDrift) -> str:
    if col.skipped_reason is not None:
        return "not judged"
    return "DRIFTED" if col.drifted else "ok"


def _headline(result: DriftResult) -> str:
    drifted = ", ".join(f"`{name}`" for name in result.drifted_columns) or "none"
    text = (f"**Dataset drift is {'DETECTED' if result.dataset_drifted else 'not detected'}**: "
            f"{result.n_drifted} of {result.n_tested} columns drifted (share {result.drift_share:.3f}; "
            f"the dataset drifts at >= {result.drift_share_threshold:g}). Drifted: {drifted}.")
    if result.new_in_current:
        text += (f" Columns only the current data has (shown, not judged): "
                 f"{', '.join(f'`{c}`' for c in result.new_in_current)}.")
    return text


def _rule(result: DriftResult) -> str:
    floors = result.floors
    return (f"A column drifts when its values drifted - the two-sample test (KS for numeric, chi-square "
            f"for categorical columns) is significant (p < {result.alpha:g} unless set per column) **and** "
            f"the effect size reaches its floor (Wasserstein distance / reference std >= {floors.numeric:g}, "
            f"Jensen-Shannon distance >= {floors.categorical:g} unless set per column) - or its "
            f"missing-value rate changed (two-proportion z-test significant and a change >= "
            f"{floors.missing:g}), or it is absent or entirely missing in the current data.")


def render_evidently_report(
    reference: Frame,
    current: Frame,
    result: DriftResult,
    html_path: str | Path,
    *,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
) -> dict[str, Any]:
    """Build an Evidently 0.7 ``DataDriftPreset`` page showing ``result`` and save it as HTML.

    Columns judged in ``result`` that have values on both sides are plotted, typed as ``result``
    typed them; frames longer than ``sample_rows`` are replaced by a seeded random sample of that many
    rows for the plots. A page with no plottable column (e.g. every input vanished) is our verdict
    table alone (:func:`render_fallback_html`).

    Returns:
        ``{"rendered_from_sample", "sample_rows_reference", "sample_rows_current", "note",
        "plotted_columns"}`` for the JSON summary (``sample_rows_*`` are the rows Evidently saw).
    """
    if sample_rows < 1:
        raise ValueError(f"sample_rows must be >= 1, got {sample_rows!r}.")
    candidates = [col for col in result.columns if col.skipped_reason is None and col.kind is not None
                  and col.n_ref > 0 and col.n_cur > 0 and col.name in current.columns]
    names = [col.name for col in candidates]
    ref_sample, ref_sampled = _sample(reference, names, sample_rows, seed)
    cur_sample, cur_sampled = _sample(current, names, sample_rows, seed + 1)
    sampled = ref_sampled or cur_sampled
    ref_sample, cur_sample = _as_judged(ref_sample, candidates), _as_judged(cur_sample, candidates)
    plotted = [col for col in candidates if _plottable(ref_sample[col.name]) and _plottable(cur_sample[col.name])]
    if sampled:
        sample_text = (f"a random sample of {len(ref_sample):,} reference rows (of {len(reference):,}) and "
                       f"{len(cur_sample):,} current rows (of {len(current):,})")
        note = ("verdicts computed exactly on all rows by mlflow-deploy-plugin; the Evidently HTML is "
                f"rendered from {sample_text}")
    else:
        sample_text = f"all rows ({len(reference):,} reference, {len(current):,} current)"
        note = ("verdicts computed exactly on all rows by mlflow-deploy-plugin; the Evidently HTML is "
                f"rendered from the same rows ({len(reference):,} reference, {len(current):,} current)")
    info = {"rendered_from_sample": sampled, "sample_rows_reference": len(ref_sample),
            "sample_rows_current": len(cur_sample), "note": note, "plotted_columns": [c.name for c in plotted]}
    if not plotted:
        render_fallback_html(result, html_path, "no column has values on both sides to plot")
        return {**info, "rendered_from_sample": False, "note": "no column to plot: the page is the verdict table"}

    banner = (f"{'**Sampled report.** ' if sampled else ''}{note[0].upper()}{note[1:]}. {_rule(result)} "
              f"Every figure and verdict on this page is that exact one; only the distributions are "
              f"drawn from {sample_text}.")
    path = str(html_path)  # Evidently's save_html writes only when given a str
    with warnings.catch_warnings():
        # Evidently and its plotting stack are noisy (FutureWarning/DeprecationWarning) on pandas 2.x.
        warnings.simplefilter("ignore")
        with _our_verdicts_as_stattests(plotted) as stattests:
            _build_and_save(ref_sample, cur_sample, result, plotted, stattests, banner,
                            sample_text if sampled else None, path)
    _ensure_banner(path, note, sampled)
    return info


@contextmanager
def _our_verdicts_as_stattests(columns: list[ColumnDrift]) -> Iterator[dict[str, str]]:
    """One Evidently stattest per column that answers our verdict; unregistered afterwards.

    Evidently calls a stattest with the two (sampled) series; ours ignore them and return the exact
    figures: the effect size as the "drift score" (the p-value at volume is ~0 and says little) and
    our drifted flag. Yields column -> stattest name for ``per_column_method``.
    """
    from evidently.legacy.calculations.stattests import registry
    from evidently.legacy.core import ColumnType

    render_id = uuid.uuid4().hex[:12]
    names: dict[str, str] = {}
    made: list[tuple[Any, Any]] = []
    try:
        for i, col in enumerate(columns):
            score = col.effect_size if col.effect_size is not None else float(col.drifted)
            drifted = bool(col.drifted)

            def answer(_ref: pd.Series, _cur: pd.Series, _kind: Any, _threshold: float,
                       score: float = score, drifted: bool = drifted) -> tuple[float, bool]:
                return score, drifted

            stat_test = registry.StatTest(
                name=f"{STATTEST_PREFIX}_{render_id}_{i}",
                display_name=col.reason.replace("drifted: ", "", 1).replace("not drifted: ", "", 1),
                allowed_feature_types=[ColumnType.Numerical, ColumnType.Categorical],
                default_threshold=col.effect_floor or 0.0,
            )
            registry.register_stattest(stat_test, default_impl=answer)
            made.append((stat_test, answer))
            names[col.name] = stat_test.name
        yield names
    finally:
        for stat_test, answer in made:  # a long-lived scheduler must not accumulate them
            registry._registered_stat_tests.pop(stat_test.name, None)
            registry._impls.pop(stat_test, None)
            registry._registered_stat_test_funcs.pop(answer, None)


def _verdict_rows(result: DriftResult) -> list[list[str]]:
    rows = []
    for col in result.columns:
        test = "" if col.score is None else f"{LABELS.get(col.method, col.method)} p={_figure(col.score)} " \
                                            f"(level {col.threshold:g})"
        effect = "" if col.effect_size is None else \
            f"{LABELS.get(col.effect_method or '', col.effect_method)} {_figure(col.effect_size)} " \
            f"(floor {col.effect_floor:g})"
        missing = "" if col.missing_rate_ref is None or col.missing_rate_cur is None else \
            f"{col.missing_rate_ref:.1%} -> {col.missing_rate_cur:.1%}"
        rows.append([col.name, col.kind or "", _verdict_word(col), test, effect, missing,
                     col.skipped_reason or col.reason])
    rows.extend([name, "", "not judged", "", "", "", "only in the current data (not in the reference)"]
                for name in result.new_in_current)
    return rows


def _annotated_preset_class() -> type:
    """DataDriftPreset whose page is: our text, our headline, our verdict table, then Evidently's
    distributions table (its cells answered by our stattests), relabelled. Built once."""
    global _preset_class
    if _preset_class is not None:
        return _preset_class
    from evidently.core.report import _default_input_data_generator
    from evidently.legacy.metrics import DataDriftTable
    from evidently.legacy.renderers.html_widgets import CounterData, counter, table_data, text_widget
    from evidently.presets import DataDriftPreset

    class AnnotatedDataDriftPreset(DataDriftPreset):
        banner: str = ""
        result: Any = None
        sample_text: str | None = None

        def __init__(self, banner: str, result: DriftResult, sample_text: str | None, **kwargs: Any) -> None:
            # pydantic model: set before the base __init__ freezes it
            self.banner, self.result, self.sample_text = banner, result, sample_text
            super().__init__(**kwargs)

        def generate_metrics(self, context: Any) -> list:
            return []  # no Evidently verdicts (DriftedColumnsCount/ValueDrift): the page shows ours

        def render(self, context: Any, child_widgets: Any = None) -> list:
            result: DriftResult = self.result
            table = context.get_legacy_metric(
                DataDriftTable(columns=self.columns, per_column_stattest=self.per_column_method),
                _default_input_data_generator, None)[1]
            headline = counter(title="Dataset drift (exact, all rows)", counters=[
                CounterData(f"Dataset drift is {'DETECTED' if result.dataset_drifted else 'NOT detected'}. "
                            f"Dataset drift threshold is {result.drift_share_threshold:g}", "Dataset Drift")])
            counts = counter(title="", counters=[
                CounterData.int("Columns judged", result.n_tested),
                CounterData.int("Drifted columns", result.n_drifted),
                CounterData.float("Share of drifted columns", result.drift_share, 3),
            ])
            verdicts = table_data(
                title=f"Verdict per column (exact, all rows: {result.n_reference:,} reference, "
                      f"{result.n_current:,} current)",
                column_names=["Column", "Kind", "Verdict", "Test p-value", "Effect size", "Missing values",
                              "Why"],
                data=_verdict_rows(result))
            verdicts.pageSize = max(10, len(result.columns) + len(result.new_in_current))
            return [text_widget(text=f"{self.banner}\n\n{_headline(result)}", title="About this report"),
                    headline, counts, verdicts, *(_relabel(w, result, self.sample_text) for w in table)]

    _preset_class = AnnotatedDataDriftPreset
    return _preset_class


def _relabel(widget: Any, result: DriftResult, sample_text: str | None) -> Any:
    """Say on Evidently's distributions table what is exact and what the sample drew."""
    if widget.type != "big_table":
        return widget
    drifted = sum(1 for row in widget.params["data"] if row.get("data_drift") == "Detected")
    widget.title = (f"Distributions of the {len(widget.params['data'])} plotted columns "
                    f"({drifted} drifted; {result.n_drifted} of {result.n_tested} judged columns overall). "
                    f"Histograms and plots: {sample_text or 'all rows'}. Verdict, figures and drift score "
                    f"(effect size): exact, all rows.")
    renames = {"Data Drift": "Drift (exact)", "Stat Test": "Verdict (exact, all rows)",
               "Drift Score": "Effect size (exact)"}
    if sample_text:
        renames.update({"Reference Distribution": "Reference Distribution (sample)",
                        "Current Distribution": "Current Distribution (sample)"})
    for column in widget.params["columns"]:
        column["title"] = renames.get(column["title"], column["title"])
    if sample_text:
        for row in widget.params["data"]:
            for part in row.get("details", {}).get("parts", []):
                part["title"] = f"{part['title']} (drawn from {sample_text})"
    return widget


def _build_and_save(ref_sample: pd.DataFrame, cur_sample: pd.DataFrame, result: DriftResult,
                    plotted: list[ColumnDrift], stattests: dict[str, str], banner: str,
                    sample_text: str | None, path: str) -> None:
    from evidently import DataDefinition, Dataset, Report

    names = [col.name for col in plotted]
    definition = DataDefinition(
        numerical_columns=[col.name for col in plotted if col.kind == "numeric"],
        categorical_columns=[col.name for col in plotted if col.kind == "categorical"],
    )
    preset = _annotated_preset_class()(
        banner, result, sample_text, columns=names, drift_share=result.drift_share_threshold,
        per_column_method=stattests,
    )
    report = Report([preset], include_tests=False)  # tests would be Evidently's verdicts, not ours
    snapshot = report.run(Dataset.from_pandas(cur_sample[names], data_definition=definition),
                          Dataset.from_pandas(ref_sample[names], data_definition=definition))
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
    """A plain HTML page of the exact verdicts, written when there is no Evidently page (it failed,
    or there is nothing to plot). The verdicts do not depend on Evidently, so they are never lost."""
    header = ["column", "kind", "verdict", "test p-value", "effect size", "missing values", "why"]
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in _verdict_rows(result))
    Path(html_path).write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Drift report</title></head><body>"
        f"<h2>Drift report (no Evidently page: {html.escape(error)})</h2>"
        f"<p>{html.escape(_headline(result).replace('**', ''))}</p><p>{html.escape(_rule(result).replace('**', ''))}</p>"
        "<table border='1' cellpadding='4'><tr>" + "".join(f"<th>{h}</th>" for h in header) +
        f"</tr>{rows}</table></body></html>",
        encoding="utf-8",
    )
