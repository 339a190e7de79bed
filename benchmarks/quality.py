"""Model quality at volume, and quality before labels.

**Join** (``--part join``): ``--predictions`` (default 10,000,000) captured predictions of a binary
classifier (two versions, five inputs, the predicted class and both class probabilities), spread
over ten UTC days in the capture layout (Parquet, ``date=`` partitions, 250,000-row files), every
one of them labelled in the label store's layout; then, in a fresh process (so its peak RSS is its
own: ``VmHWM``, read by ``procfs.peak_rss_bytes`` as the other benchmarks do), what
``mlflow-deploy quality report`` runs on them: the labels joined to the predictions one day
partition at a time (:func:`..quality.join.join_window`) and
the report (:func:`..quality.report.run_quality_report`: accuracy, precision / recall / F1, ROC
AUC and log loss with their intervals, per version, logged to a SQLite MLflow store with the
Evidently page). Goal: <= 60 s and <= 1 GB peak RSS. Checked: the reported accuracy equals the one
computed from the generated data.

**CBPE** (``--part cbpe``): the estimate of accuracy against the realised accuracy under covariate shift.

Calls :class:`mlflow_deploy_plugin.quality.cbpe.CBPE` directly. A classifier (logistic regression,
or Gaussian naive Bayes, which is badly calibrated) is trained on ``make_classification`` data; CBPE
is calibrated on a labelled reference sample of the same distribution; each scenario draws a
"production" sample from a large pool of the same generator by *importance sampling* on the
inputs, so P(y | x) is untouched (pure covariate shift, the assumption CBPE rests on) while the mix
of easy and hard rows, and so the accuracy, changes:

* ``none``: a plain random sample;
* ``feature``: rows with a large first informative feature are favoured (weights exp(1.5 x0));
* ``hard``: rows near the decision boundary are favoured (weights exp(-1.5 |logit|)): accuracy drops;
* ``easy``: rows far from the boundary are favoured: accuracy rises;
* ``concept`` (a failure on purpose): 15 % of the production labels are flipped, P(y | x) changes;
  CBPE cannot see this and its error is the size of the drop.

Per scenario and model: the realised accuracy, the estimate with its 95 % interval, the absolute
error, whether the realised figure is in the interval, and the uncalibrated estimate (mean of the
model's own max probability) to show what calibration buys. ``--repeats`` draws each scenario
anew and reports the mean and max absolute error.

    .venv/bin/python benchmarks/quality.py --part cbpe   # ~10 s; --rows 20000 --repeats 20 for tighter figures
    .venv/bin/python benchmarks/quality.py --part join   # 10M predictions: generated (~1-2 min), then timed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import procfs  # benchmarks/procfs.py
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB

from mlflow_deploy_plugin.quality.cbpe import CBPE

SCENARIOS = ("none", "feature", "hard", "easy", "concept")


def _frame(proba: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(proba, columns=[str(c) for c in range(proba.shape[1])])


def _sample(rng: np.random.Generator, weights: np.ndarray, rows: int) -> np.ndarray:
    return rng.choice(len(weights), size=rows, replace=False, p=weights / weights.sum())


def run(rows: int, repeats: int, classes: int, seed: int) -> None:
    x, y = make_classification(n_samples=rows * 40 + 30_000, n_features=10, n_informative=5, n_redundant=2,
                               n_classes=classes, n_clusters_per_class=1, flip_y=0.05, class_sep=0.8,
                               random_state=seed)
    x_train, y_train = x[:10_000], y[:10_000]
    x_ref, y_ref = x[10_000:10_000 + rows], y[10_000:10_000 + rows]
    x_pool, y_pool = x[10_000 + rows:], y[10_000 + rows:]
    print(f"{classes} classes; train 10,000 rows, calibration {rows:,} labelled rows, production {rows:,} rows "
          f"drawn from a pool of {len(y_pool):,}; {repeats} draw(s) per scenario")
    print(f"{'model':<9} {'scenario':<9} {'realised':>9} {'estimate':>9} {'95% interval':>15} {'abs err':>8} "
          f"{'max err':>8} {'in CI':>6} {'uncal.':>7} {'est AUC':>8} {'real AUC':>9}")
    for model_name, model in (("logreg", LogisticRegression(max_iter=1000)), ("naivebayes", GaussianNB())):
        model.fit(x_train, y_train)
        cbpe = CBPE.fit(_frame(model.predict_proba(x_ref)), pd.Series(y_ref.astype(str)))
        pool_proba = model.predict_proba(x_pool)
        logit = np.log(np.clip(pool_proba.max(axis=1), 1e-9, 1)) - np.log(
            np.clip(1 - pool_proba.max(axis=1), 1e-9, 1))
        weights = {"none": np.ones(len(y_pool)), "feature": np.exp(1.5 * x_pool[:, 0]),
                   "hard": np.exp(-1.5 * np.abs(logit)), "easy": np.exp(1.5 * np.minimum(np.abs(logit), 4)),
                   "concept": np.ones(len(y_pool))}
        for scenario in SCENARIOS:
            rng = np.random.default_rng(seed)
            errors, inside, last = [], 0, None
            for _ in range(repeats):
                idx = _sample(rng, weights[scenario], rows)
                proba, truth = pool_proba[idx], y_pool[idx].copy()
                if scenario == "concept":
                    flip = rng.random(rows) < 0.15
                    truth[flip] = (truth[flip] + 1 + rng.integers(0, classes - 1, flip.sum())) % classes
                predicted = proba.argmax(axis=1)
                realised = float((predicted == truth).mean())
                found = {e.name: e for e in cbpe.estimate(_frame(proba), pd.Series(predicted))}
                acc = found["estimated_accuracy"]
                errors.append(abs(acc.value - realised))
                inside += acc.low <= realised <= acc.high
                real_auc = _realised_auc(truth, proba)
                last = (realised, acc, float(proba.max(axis=1).mean()),
                        found["estimated_roc_auc"].value if "estimated_roc_auc" in found else float("nan"), real_auc)
            assert last is not None
            realised, acc, uncalibrated, est_auc, real_auc = last
            print(f"{model_name:<9} {scenario:<9} {realised:>9.4f} {acc.value:>9.4f} "
                  f"{acc.low:>7.4f}–{acc.high:.4f} {np.mean(errors):>8.4f} {np.max(errors):>8.4f} "
                  f"{inside:>3}/{repeats:<2} {uncalibrated:>7.4f} {est_auc:>8.4f} {real_auc:>9.4f}")


def _realised_auc(truth: np.ndarray, proba: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if proba.shape[1] == 2:
        return float(roc_auc_score(truth, proba[:, 1]))
    return float(roc_auc_score(truth, proba, multi_class="ovr", average="macro"))


DAYS = 10
FILE_ROWS = 250_000
START = datetime(2026, 1, 1, tzinfo=UTC)


def generate(root: Path, predictions: int, seed: int) -> int:
    """Write the capture and its labels; returns how many predictions are right (for the check)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlflow_deploy_plugin.quality.labels import STORED_SCHEMA

    rng = np.random.default_rng(seed)
    per_day = predictions // DAYS
    right = 0
    for day in range(DAYS):
        folder, labels = root / f"date={(START + timedelta(days=day)):%Y-%m-%d}", root / "_labels"
        folder.mkdir(parents=True)
        label_parts = []
        for start in range(0, per_day, FILE_ROWS):
            n = min(FILE_ROWS, per_day - start)
            ids = pa.array(np.arange(day * per_day + start, day * per_day + start + n)).cast(pa.string())
            micros = int((START + timedelta(days=day)).timestamp() * 1e6) + np.sort(rng.integers(0, 86_399_000_000, n))
            p1 = rng.uniform(0, 1, n)
            predicted = (p1 >= 0.5).astype(np.int64)
            truth = np.where(rng.uniform(0, 1, n) < np.maximum(p1, 1 - p1), predicted, 1 - predicted)
            right += int((predicted == truth).sum())
            versions = np.where(rng.uniform(0, 1, n) < 0.5, "1", "2")
            table = pa.table({
                "_request_id": ids, "_timestamp": pa.array(micros, pa.timestamp("us", tz="UTC")),
                "_deployment": pa.array(["bench"] * n), "_model_version": pa.array(versions),
                "_status": pa.array(np.full(n, 200, np.int16)), "_latency_ms": rng.uniform(1, 9, n),
                "_row": pa.array(np.zeros(n, np.int32)),
                **{f"x{i}": rng.normal(0, 1, n) for i in range(5)},
                "_prediction": predicted, "_prediction_proba_0": 1 - p1, "_prediction_proba_1": p1})
            pq.write_table(table, folder / f"part-{start // FILE_ROWS:04d}.parquet")
            label_parts.append(pa.table({
                "_request_id": ids, "_row": pa.array(np.zeros(n, np.int32)),
                "_timestamp": table["_timestamp"], "_model_version": table["_model_version"],
                "_label": pa.array(truth.astype(str)), "_labelled_at": table["_timestamp"]}, schema=STORED_SCHEMA))
        (labels / folder.name).mkdir(parents=True)
        pq.write_table(pa.concat_tables(label_parts), labels / folder.name / "labels.parquet")
    return right


def child_join(root: str) -> dict:
    """The timed part (in its own process): join and report, as ``mlflow-deploy quality report`` does."""
    import mlflow

    from mlflow_deploy_plugin.quality.join import join_window
    from mlflow_deploy_plugin.quality.report import run_quality_report

    mlflow.set_tracking_uri(f"sqlite:///{Path(root).parent}/mlflow.db")
    mlflow.MlflowClient().search_experiments()  # the store's tables are created before the clock starts
    import evidently  # noqa: F401  (imported before the clock, as the drift benchmark does)

    since, until = START, START + timedelta(days=DAYS)
    started = time.perf_counter()
    window = join_window(root, since, until, task_for=lambda _p: "classification")
    joined_s = time.perf_counter() - started
    outcomes = run_quality_report(deployment="bench", model_name="bench", joined=window.labelled, task=window.task,
                                  window_start=since, window_end=until, experiment_name="quality-bench")
    total_s = time.perf_counter() - started
    return {"rows": window.rows, "labels": window.labels, "join_s": joined_s, "total_s": total_s,
            "peak_rss_mb": procfs.peak_rss_bytes() / 2**20,
            "versions": {o.model_version: {"labelled": o.rows_labelled, "accuracy": o.figures["accuracy"].value,
                                           "n": o.figures["accuracy"].n} for o in outcomes}}


def run_join(predictions: int, seed: int) -> None:
    with tempfile.TemporaryDirectory(prefix="quality-bench-") as tmp:
        root = Path(tmp) / "capture"
        started = time.perf_counter()
        right = generate(root, predictions, seed)
        print(f"generated {predictions:,} captured predictions + {predictions:,} labels over {DAYS} days "
              f"in {time.perf_counter() - started:.1f} s (not timed)")
        proc = subprocess.run([sys.executable, __file__, "--child-join", str(root)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the timed process failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        n = sum(v["n"] for v in result["versions"].values())
        hits = sum(round(v["accuracy"] * v["n"]) for v in result["versions"].values())
        print(f"joined {result['labels']:,} labels to {result['rows']:,} predictions in {result['join_s']:.1f} s; "
              f"joined + reported (2 versions, every figure, MLflow + Evidently HTML) in {result['total_s']:.1f} s; "
              f"peak RSS {result['peak_rss_mb']:.0f} MB (goal: <= 60 s, <= 1024 MB)")
        for version, figures in result["versions"].items():
            print(f"  v{version}: {figures['labelled']:,} labelled rows, accuracy {figures['accuracy']:.6f}")
        print(f"check: reported accuracy over both versions {hits / n:.6f} = generated {right / predictions:.6f}: "
              f"{'OK' if hits == right and n == predictions else 'MISMATCH'}")
        print(f"load average {' '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "join", "cbpe"), default="all")
    parser.add_argument("--predictions", type=int, default=10_000_000, help="captured (and labelled) predictions")
    parser.add_argument("--rows", type=int, default=5_000, help="CBPE: calibration rows = production rows per draw")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-join", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_join:
        print(json.dumps(child_join(args.child_join)))
        return
    started = time.perf_counter()
    if args.part in ("all", "join"):
        run_join(args.predictions, args.seed)
        print()
    if args.part in ("all", "cbpe"):
        for classes in (2, 3):
            run(args.rows, args.repeats, classes, args.seed)
            print()
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
