"""Quality before labels: the CBPE estimate of accuracy against the realised accuracy under covariate shift.

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

    .venv/bin/python benchmarks/quality.py            # ~10 s; --rows 20000 --repeats 20 for tighter figures
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5_000, help="calibration rows = production rows per draw")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    for classes in (2, 3):
        run(args.rows, args.repeats, classes, args.seed)
        print()
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
