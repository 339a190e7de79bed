"""The labelled rows of a canary's two versions (policy ``promotion.canary.quality_margin``).

Capture records which version answered each row and labels are stored with the version of the
prediction they name (:mod:`..quality.labels`), so over the canary window (since it started) each
version's labelled rows are exactly those it answered: the challenger's and the champion's
quality are compared on the same window, each on its own rows. This module sums them up (rows,
right answers or absolute errors); :func:`.canary.evaluate_canary` judges them.

Labels reach the store only already resolved to a captured prediction, so the figures change only
when labels come in: the controller reads them again at most every :data:`RECHECK_S`.
"""

from __future__ import annotations

from datetime import datetime

from mlflow_deploy_plugin.lifecycle.canary import CanaryQuality, LabelledSide
from mlflow_deploy_plugin.state import StateStore

# How often a running canary's labelled rows are read again (labels come in batches, and late).
RECHECK_S = 5.0


def labelled_sides(store: StateStore, name: str, champion: str, challenger: str, since: datetime,
                   until: datetime) -> CanaryQuality:
    """The challenger's and the champion's labelled rows among those they answered in [since, until)."""
    # Imported here: pandas and pyarrow are loaded only by a controller whose canary checks labels.
    import numpy as np
    import pandas as pd

    from mlflow_deploy_plugin.capture import capture_root, read_capture
    from mlflow_deploy_plugin.quality.join import join_labels
    from mlflow_deploy_plugin.quality.labels import canonical, labels_root, read_labels
    from mlflow_deploy_plugin.quality.report import deployment_task

    spec = store.read_spec(name)
    if spec is None:
        raise LookupError(f"no deployment named {name!r}")
    paths = store.paths(name)
    root = capture_root(name, spec.config.capture_uri, str(paths.capture))
    labels = read_labels(labels_root(root), since, until)
    labels = labels[labels["_model_version"].astype(str).isin([champion, challenger])]
    captured = read_capture(root, since=since, until=until) if len(labels) else None
    from mlflow_deploy_plugin.quality.join import prediction_column

    pred = prediction_column([str(c) for c in captured.columns]) if captured is not None else None
    task = deployment_task(spec, paths, captured[pred] if captured is not None and pred else None)
    by_version = {one.version: one for one in join_labels(captured, labels)} if captured is not None else {}

    def side(version: str) -> LabelledSide:
        one = by_version.get(version)
        if one is None or one.n == 0:
            return LabelledSide(0, 0.0)  # no NaN: the figures go to JSON state and history
        if task == "regression":
            errors = np.abs(pd.to_numeric(one.prediction, errors="coerce").to_numpy(dtype=float)
                            - pd.to_numeric(one.label, errors="coerce").to_numpy(dtype=float))
            errors = errors[np.isfinite(errors)]
            n = len(errors)
            return LabelledSide(n, float(errors.mean()) if n else 0.0,
                                sd=float(errors.std(ddof=1)) if n > 1 else 0.0)
        # Compared as text, as the quality report does (1, 1.0 and "1" are one class).
        right = canonical(one.prediction).to_numpy(dtype=object) == one.label.astype(object).to_numpy()
        hits = int(right.sum())
        return LabelledSide(one.n, hits / one.n, hits=hits)

    detail = (f"labels of the rows answered since the canary started, {since:%Y-%m-%d %H:%M:%S} to "
              f"{until:%H:%M:%S} UTC")
    return CanaryQuality("regression" if task == "regression" else "classification", side(challenger),
                         side(champion), detail)
