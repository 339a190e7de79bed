"""Model quality from ground truth: labels joined to captured predictions, quality per version over time.

One module per job:

- :mod:`.labels`: labels in (CSV/Parquet files, ``POST /labels``, :func:`add_labels`), checked,
  resolved to the captured prediction they name, stored beside the capture (idempotent);
- :mod:`.join`: stored labels joined to a window of captured rows, per version;
- :mod:`.metrics`: the figures (classification, regression) with counts and 95 % intervals;
- :mod:`.cbpe`: quality before the labels arrive: accuracy (and ROC AUC) estimated from calibrated
  probabilities (confidence-based performance estimation);
- :mod:`.report`: the quality job: per version, figures logged to MLflow beside the training
  run's own, an HTML report, the version tagged;
- :mod:`.cli`: ``mlflow-deploy labels add`` and ``mlflow-deploy quality report``.

Serving imports :mod:`.labels` (for ``POST /labels``), so this package's import stays light: the
report (MLflow tracking) is imported only where it runs.
"""

from mlflow_deploy_plugin.quality.labels import LabelError, LabelResult, add_labels, read_labels

__all__ = ["LabelError", "LabelResult", "add_labels", "read_labels"]
