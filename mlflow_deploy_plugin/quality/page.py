"""The quality report's HTML: Evidently's classification or regression page, headed by our exact figures.

The figures (and their intervals) are computed by :mod:`.metrics` on every labelled row; Evidently
draws its plots from a seeded sample of at most ``sample_rows`` rows. Our table is put at the top
of the page so the numbers people read are the ones logged as metrics. If Evidently fails, a plain
page with the same table is written instead: the figures never depend on it.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from mlflow_deploy_plugin.quality.metrics import Figure

_log = logging.getLogger(__name__)
DEFAULT_SAMPLE_ROWS = 20_000


def figures_table(title: str, figures: list[Figure], reference: dict[str, tuple[str, float]], note: str,
                  estimate: str = "") -> str:
    """An HTML block: one row per figure with n, 95 % interval and the training run's figure, and
    ``estimate``, CBPE's line (quality before labels, :mod:`.cbpe`), under the note when given."""
    rows = []
    for fig in figures:
        ref = reference.get(fig.name)
        rows.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in (
            fig.name, f"{fig.value:.4g}", f"{fig.low:.4g} – {fig.high:.4g}", f"{fig.n:,}", fig.interval,
            f"{ref[1]:.4g} ({ref[0]})" if ref else "")) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in ("figure", "production", "95% CI", "n", "interval", "training run"))
    return (f'<div id="mlflow-deploy-quality" style="padding:8px 16px;font-family:sans-serif;background:#f5f8ff;'
            f'border-bottom:1px solid #99b">'
            f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>"
            + (f'<p id="mlflow-deploy-cbpe"><b>Before labels (CBPE):</b> {html.escape(estimate)}</p>' if estimate else "")
            + f"<table border='1' cellpadding='4' style='border-collapse:collapse'><tr>{header}</tr>"
            f"{''.join(rows)}</table></div>")


def _evidently(task: str, sample: pd.DataFrame, path: Path) -> None:
    from evidently import (
        BinaryClassification,
        DataDefinition,
        Dataset,
        MulticlassClassification,
        Regression,
        Report,
    )
    from evidently.presets import ClassificationPreset, RegressionPreset

    if task == "regression":
        definition = DataDefinition(regression=[Regression(target="target", prediction="prediction")])
        preset = RegressionPreset()
    else:
        classes = sorted(set(sample["target"]) | set(sample["prediction"]))
        if len(classes) <= 2:
            spec = BinaryClassification(target="target", prediction_labels="prediction", pos_label=classes[-1])
            definition = DataDefinition(classification=[spec], categorical_columns=["target", "prediction"])
        else:
            definition = DataDefinition(classification=[MulticlassClassification(
                target="target", prediction_labels="prediction")], categorical_columns=["target", "prediction"])
        preset = ClassificationPreset()
    snapshot = Report([preset]).run(current_data=Dataset.from_pandas(sample, data_definition=definition),
                                    reference_data=None)
    snapshot.save_html(str(path))


def render_quality_html(path: str | Path, *, task: str, prediction: pd.Series, label: pd.Series,
                        table: str, sample_rows: int = DEFAULT_SAMPLE_ROWS, seed: int = 0) -> str | None:
    """Write the page to ``path``; returns None, or why Evidently's part is missing."""
    path = Path(path)
    if len(label) > sample_rows:  # sampled first (rows, not a copy of every row): what follows costs per row
        rows = np.sort(np.random.default_rng(seed).choice(len(label), size=sample_rows, replace=False))
        label, prediction = label.iloc[rows], prediction.iloc[rows]
    frame = pd.DataFrame({"target": label.to_numpy(), "prediction": prediction.to_numpy()})
    if task == "regression":
        frame = frame.apply(pd.to_numeric, errors="coerce").dropna()
    else:
        from mlflow_deploy_plugin.quality.labels import canonical

        frame["prediction"] = canonical(frame["prediction"].astype(object)).to_numpy()
        frame["target"] = frame["target"].astype(object)
        frame = frame.dropna().astype(str)
    problem = None
    if frame.empty:
        problem = "no labelled rows to plot"
    else:
        try:
            _evidently(task, frame.reset_index(drop=True), path)
        except Exception as exc:
            _log.exception("Evidently failed to render the quality report")
            problem = f"Evidently failed to render: {type(exc).__name__}: {exc}"[:2000]
    if problem is None:
        text = path.read_text(encoding="utf-8")
        start = text.lower().find("<body")
        end = text.find(">", start) + 1 if start >= 0 else 0
        path.write_text(text[:end] + table + text[end:], encoding="utf-8")
    else:
        path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>Quality report</title></head>"
                        f"<body>{table}<p>No Evidently page: {html.escape(problem)}</p></body></html>",
                        encoding="utf-8")
    return problem
