"""Quality before the labels arrive: confidence-based performance estimation (CBPE) of a classifier.

The method is NannyML's CBPE (NannyML documentation, "Confidence-based Performance Estimation";
nannyml.performance_estimation.confidence_based): calibrate the model's predicted probabilities on
*labelled* data, then, on unlabelled traffic, the calibrated probability of each row's predicted
class is the probability that the prediction is right, so

    expected accuracy = mean over rows of p_calibrated(predicted class).

For a binary model the expected ROC AUC follows the same idea (NannyML's ``estimate_roc_auc``): rank
the rows by the model's score; at each threshold the expected true positives are the running sum
of the calibrated positive probabilities and the expected false positives that of their
complements, which gives an expected ROC curve and its area. A multiclass model gets the macro
average of the one-vs-rest areas (the realised ``roc_auc`` of :mod:`.metrics` is averaged the same way).

Calibration is isotonic regression per class, one-vs-rest, then renormalised to sum to one (as
scikit-learn's ``CalibratedClassifierCV(method="isotonic")`` does for multiclass models); a binary
model is calibrated on its positive-class score only. We implement the method on numpy and
scikit-learn instead of depending on nannyml (DESIGN.md: its pins would constrain ours).

What it assumes (below), and so what the estimate cannot see: the relation between inputs and labels is the
one of the calibration data (covariate shift only, no concept drift), and the production scores lie
in the range the calibration data covered. A concept drift shows up as a gap between the estimate
and the realised figure once labels arrive, which is why the report shows both side by side.

The interval of ``estimated_accuracy`` (normal, 95 %) adds two variances: the realised accuracy
of these n rows is a mean of independent Bernoulli(p_i), variance sum p_i (1 - p_i) / n²; and the
calibration map is learnt from m labelled rows, so the estimate carries roughly the sampling error
of an accuracy measured on them, mean p_i (1 - p_i) / m (with 5,000 rows on each side this second
term is as large as the first; leaving it out made the interval cover far too rarely in
``benchmarks/quality.py``). It does not cover a broken assumption (below).

Pure numpy/scikit-learn: no tracking, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression

from mlflow_deploy_plugin.quality.metrics import Z95

#: Fewer labelled calibration rows than this, and a fit is refused (isotonic steps over a handful of
#: rows are noise, not a calibration map).
DEFAULT_MIN_ROWS = 100


class CalibrationError(ValueError):
    """CBPE cannot be calibrated on the given data; ``str(error)`` says why, for the report."""


@dataclass(frozen=True)
class Estimate:
    """One estimated figure with its 95 % interval (NaN when none is computed) and its rows."""

    name: str
    value: float
    low: float
    high: float
    n: int


def _canonical(values: pd.Series) -> np.ndarray:
    from mlflow_deploy_plugin.quality.labels import canonical

    if isinstance(values.dtype, pd.CategoricalDtype):  # the quality job's classes: text made once per class
        from mlflow_deploy_plugin.quality.join import text_categorical

        return np.asarray(text_categorical(values).to_numpy(dtype=object), dtype=object)
    return np.asarray(canonical(values).to_numpy(dtype=object), dtype=object)


@dataclass
class CBPE:
    """A fitted CBPE: the classes (probability columns) and one isotonic map per calibrated column."""

    classes: list[str]
    calibrators: list[IsotonicRegression]
    n_calibration: int

    @property
    def single_score(self) -> bool:
        """One calibrated score (binary model): that of ``classes[-1]``, the positive class."""
        return len(self.calibrators) == 1

    @classmethod
    def fit(cls, probabilities: pd.DataFrame, label: pd.Series, *, min_rows: int = DEFAULT_MIN_ROWS) -> CBPE:
        """Calibrate on labelled rows: ``probabilities`` has one column per class named by its
        canonical text (a single column is the positive class of a binary model), ``label`` the
        true classes (text, as :func:`.labels.canonical` writes them).

        Raises:
            CalibrationError: fewer than ``min_rows`` usable rows, or one class only among the labels.
        """
        classes = [str(c) for c in probabilities.columns]
        if not classes:
            raise CalibrationError("the captured answers hold no class probabilities")
        probs = probabilities.to_numpy(dtype=float)
        y = _canonical(label)
        usable = np.isfinite(probs).all(axis=1)
        if len(classes) > 1:
            usable &= np.isin(y, classes)  # a label with no probability column cannot calibrate one
        probs, y = probs[usable], y[usable]
        n = len(y)
        if n < min_rows:
            raise CalibrationError(f"{n} labelled rows with probabilities to calibrate on, fewer than {min_rows}")
        seen = sorted({str(v) for v in y})
        if len(seen) < 2:
            raise CalibrationError(f"the calibration labels hold one class only ({seen[0]!r}): "
                                   "no probability can be calibrated against them")
        if len(classes) == 1:
            positive = y == classes[0]
            if positive.all() or not positive.any():
                raise CalibrationError(f"the calibration labels are all {'' if positive.all() else 'not '}"
                                       f"{classes[0]!r}: the positive score cannot be calibrated")
        columns = [probs[:, -1]] if len(classes) <= 2 else [probs[:, j] for j in range(len(classes))]
        targets = [y == classes[-1]] if len(classes) <= 2 else [y == c for c in classes]
        calibrators = [IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, t.astype(float))
                       for x, t in zip(columns, targets, strict=True)]
        return cls(classes, calibrators, n)

    def calibrate(self, probabilities: pd.DataFrame) -> np.ndarray:
        """Calibrated probabilities, one column per class of :attr:`classes` (two for a single score:
        not-positive, positive); rows with a missing probability are NaN."""
        probs = probabilities[self.classes].to_numpy(dtype=float)
        if self.single_score:
            positive = self.calibrators[0].predict(np.nan_to_num(probs[:, -1]))
            out = np.stack([1 - positive, positive], axis=1)
        else:
            out = np.stack([c.predict(np.nan_to_num(probs[:, j])) for j, c in enumerate(self.calibrators)], axis=1)
            total = out.sum(axis=1, keepdims=True)
            # All maps at 0 (scores never seen in calibration): fall back to uniform, not a division by 0.
            out = np.divide(out, total, out=np.full_like(out, 1 / out.shape[1]), where=total > 0)
        out[~np.isfinite(probs).all(axis=1)] = np.nan
        return out

    def _predicted_index(self, probs: np.ndarray, prediction: pd.Series | None) -> np.ndarray:
        """Index into the calibrated columns of each row's predicted class: the captured prediction
        where it names a class, else the arg-max of the model's own probabilities."""
        if self.single_score:
            fallback = (probs[:, -1] >= 0.5).astype(int)
            if prediction is None:
                return fallback
            if isinstance(prediction.dtype, pd.CategoricalDtype):
                from mlflow_deploy_plugin.quality.join import text_categorical

                texts = text_categorical(prediction)
                positive = np.array([c == self.classes[-1] for c in texts.cat.categories] + [False])
                codes = texts.cat.codes.to_numpy()
                return np.where(codes >= 0, positive[codes].astype(int), fallback)
            predicted = _canonical(prediction)
            known = pd.notna(predicted)
            return np.where(known, (predicted == self.classes[-1]).astype(int), fallback)
        fallback = np.nan_to_num(probs, nan=-1.0).argmax(axis=1)
        if prediction is None:
            return fallback
        codes = {c: i for i, c in enumerate(self.classes)}
        if isinstance(prediction.dtype, pd.CategoricalDtype):  # the quality job's: one lookup per class
            from mlflow_deploy_plugin.quality.join import text_categorical

            texts = text_categorical(prediction)
            lookup = np.array([codes.get(c, -1) for c in texts.cat.categories] + [-1])
            index = lookup[texts.cat.codes.to_numpy()]  # code -1 (no prediction) reads the trailing -1
            return np.where(index >= 0, index, fallback)
        return np.array([codes.get(v, f) for v, f in zip(_canonical(prediction), fallback, strict=True)])

    def estimate(self, probabilities: pd.DataFrame, prediction: pd.Series | None = None) -> list[Estimate]:
        """``estimated_accuracy`` (with its interval) and ``estimated_roc_auc`` of unlabelled rows.

        ``prediction`` is the captured predicted class of each row (same order); without it the
        arg-max of ``probabilities`` (a binary score at 0.5) is taken as the model's answer.
        """
        raw = probabilities[self.classes].to_numpy(dtype=float)
        calibrated = self.calibrate(probabilities)
        ok = np.isfinite(calibrated).all(axis=1)
        raw, calibrated = raw[ok], calibrated[ok]
        n = len(calibrated)
        if n == 0:
            return []
        pred = prediction[ok].reset_index(drop=True) if prediction is not None else None
        right = calibrated[np.arange(n), self._predicted_index(raw, pred)]
        accuracy = float(right.mean())
        spread = right * (1 - right)
        half = Z95 * math.sqrt(float(spread.sum()) / n**2 + float(spread.mean()) / self.n_calibration)
        out = [Estimate("estimated_accuracy", accuracy, max(0.0, accuracy - half), min(1.0, accuracy + half), n)]
        if self.single_score:
            areas = [expected_auc(raw[:, -1], calibrated[:, 1])]
        else:
            areas = [expected_auc(raw[:, j], calibrated[:, j]) for j in range(len(self.classes))]
        finite = [a for a in areas if np.isfinite(a)]
        if finite:
            out.append(Estimate("estimated_roc_auc", float(np.mean(finite)), math.nan, math.nan, n))
        return out


def expected_auc(score: np.ndarray, p_positive: np.ndarray) -> float:
    """Expected ROC AUC of rows ranked by ``score`` whose chance to be positive is ``p_positive``.

    Thresholds between distinct scores (ties move together, as in a realised ROC curve); expected
    TPR and FPR are the running sums of p and 1 - p over their totals; the area is the trapezoid sum.
    NaN when the expected positives or negatives are (nearly) none.
    """
    positives, negatives = float(p_positive.sum()), float((1 - p_positive).sum())
    if positives < 1e-9 or negatives < 1e-9:
        return math.nan
    order = np.argsort(-score, kind="stable")
    s, p = score[order], p_positive[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(p)[last_of_tie]
    fp = np.cumsum(1 - p)[last_of_tie]
    tpr = np.r_[0.0, tp / positives]
    fpr = np.r_[0.0, fp / negatives]
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))
