"""Quality figures of one version's labelled rows, each with its number of rows and a 95 % interval.

Proportions (accuracy, per-class precision and recall) get the Wilson score interval (Wilson 1927:
right coverage at small n and near 0 or 1, unlike the normal approximation). Every other figure
(F1, macro averages, ROC AUC, log loss, MAE, RMSE, R², MAPE) gets a percentile bootstrap interval
(Efron & Tibshirani 1993), seeded so a report is reproducible. The bootstrap resamples at most
``max_bootstrap_rows`` rows and scales the spread by sqrt(m/n) to the full n (the spread of these
estimators shrinks as 1/sqrt(n)), so ten million labelled rows cost what fifty thousand do.

Pure numpy/scipy: no tracking, no I/O, so the figures can be checked against a hand computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

Z95 = float(norm.ppf(0.975))
_EPS = 1e-15


@dataclass(frozen=True)
class Figure:
    """One quality figure: value, 95 % interval, rows it rests on, and how the interval was made."""

    name: str
    value: float
    low: float
    high: float
    n: int
    interval: str  # "wilson" or "bootstrap"

    def text(self) -> str:
        return f"{self.value:.4g} (n = {self.n:,}, 95% CI {self.low:.4g}–{self.high:.4g})"


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = 200,
              max_rows: int = 50_000, seed: int = 0, full: float | None = None) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of ``statistic(indices)`` over ``n`` rows.

    ``statistic`` takes row indices (with repeats). With ``n > max_rows`` a seeded subsample of
    ``max_rows`` rows is resampled and the spread around the full-data value (``full``, computed
    when not given) scaled by sqrt(m/n).
    """
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    if full is None and n > max_rows:
        full = statistic(np.arange(n))
    base = np.arange(n) if n <= max_rows else rng.choice(n, size=max_rows, replace=False)
    m = len(base)
    values = []
    for _ in range(resamples):
        value = statistic(base[rng.integers(0, m, size=m)])
        if np.isfinite(value):
            values.append(value)
    if not values:
        return (math.nan, math.nan)
    low, high = np.percentile(values, [2.5, 97.5])
    if m < n:
        assert full is not None
        centre = statistic(base)
        scale = math.sqrt(m / n)
        low, high = full + (low - centre) * scale, full + (high - centre) * scale
    return (float(low), float(high))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in name)[:60]


def classification_figures(prediction: pd.Series, label: pd.Series, probabilities: pd.DataFrame | None = None,
                           *, seed: int = 0) -> list[Figure]:
    """Accuracy, precision/recall/F1 (macro and per class), and ROC AUC and log loss with probabilities.

    ``prediction`` and ``label`` are compared as text (:func:`.labels.canonical`); ``probabilities``
    has one column per class named by its text.
    """
    from mlflow_deploy_plugin.quality.join import text_categorical

    n = len(label)
    figures: list[Figure] = []
    if n == 0:
        return figures
    # Classes as codes of one shared list of texts (vectorised: ten million rows cost a factorisation).
    pred_text, true_text = text_categorical(prediction), text_categorical(label)
    if pred_text.isna().any():  # an answer without a value is wrong, and counted as the class "None"
        pred_text = pred_text.cat.add_categories([c for c in ["None"] if c not in pred_text.cat.categories])
        pred_text = pred_text.fillna("None")
    classes = sorted(set(true_text.cat.categories) | set(pred_text.cat.categories), key=str)
    # Codes in the categorical's own small integer type (int8 for up to 127 classes): 5M rows cost 5 MB each.
    t = true_text.cat.set_categories(classes).cat.codes.to_numpy()
    p = pred_text.cat.set_categories(classes).cat.codes.to_numpy()
    correct = t == p
    hits = int(correct.sum())
    figures.append(Figure("accuracy", hits / n, *wilson(hits, n), n, "wilson"))
    k = len(classes)

    def macro_f1(idx: np.ndarray) -> float:
        tt, pp = t[idx], p[idx]
        tp = np.bincount(tt[tt == pp], minlength=k).astype(float)
        pred_n = np.bincount(pp, minlength=k).astype(float)
        true_n = np.bincount(tt, minlength=k).astype(float)
        f1 = np.divide(2 * tp, pred_n + true_n, out=np.zeros(k), where=(pred_n + true_n) > 0)
        return float(f1[true_n > 0].mean()) if (true_n > 0).any() else math.nan

    tp = np.bincount(t[correct], minlength=k)
    pred_n = np.bincount(p, minlength=k)
    true_n = np.bincount(t, minlength=k)
    precisions, recalls = [], []
    for i, cls in enumerate(classes):
        name = _safe(str(cls))
        if pred_n[i]:
            precision = tp[i] / pred_n[i]
            precisions.append(precision)
            figures.append(Figure(f"precision.{name}", precision, *wilson(int(tp[i]), int(pred_n[i])),
                                  int(pred_n[i]), "wilson"))
        if true_n[i]:
            recall = tp[i] / true_n[i]
            recalls.append(recall)
            figures.append(Figure(f"recall.{name}", recall, *wilson(int(tp[i]), int(true_n[i])),
                                  int(true_n[i]), "wilson"))
        if pred_n[i] + true_n[i]:
            idx_i = i

            def f1_of(idx: np.ndarray, i: int = idx_i) -> float:
                tt, pp = t[idx], p[idx]
                both = np.sum((tt == i) & (pp == i))
                total = np.sum(tt == i) + np.sum(pp == i)
                return 2 * both / total if total else math.nan

            f1_i = 2 * tp[i] / (pred_n[i] + true_n[i])
            figures.append(Figure(f"f1.{name}", f1_i, *bootstrap(f1_of, n, seed=seed, full=f1_i), n, "bootstrap"))
    # Macro averages over the classes present (in the labels for recall/F1, predicted for precision).
    if precisions:
        figures.append(Figure("precision_macro", float(np.mean(precisions)),
                              *bootstrap(lambda idx: _macro_precision(t[idx], p[idx], k), n, seed=seed,
                                         full=float(np.mean(precisions))), n, "bootstrap"))
    if recalls:
        figures.append(Figure("recall_macro", float(np.mean(recalls)),
                              *bootstrap(lambda idx: _macro_recall(t[idx], p[idx], k), n, seed=seed,
                                         full=float(np.mean(recalls))), n, "bootstrap"))
    f1_value = macro_f1(np.arange(n))
    figures.append(Figure("f1_macro", f1_value, *bootstrap(macro_f1, n, seed=seed, full=f1_value), n, "bootstrap"))
    if probabilities is not None and len(probabilities.columns):
        figures.extend(_probability_figures(t, classes, probabilities, seed))
    return figures


def _macro_precision(t: np.ndarray, p: np.ndarray, k: int) -> float:
    tp = np.bincount(t[t == p], minlength=k)
    pred_n = np.bincount(p, minlength=k)
    return float(np.mean(tp[pred_n > 0] / pred_n[pred_n > 0])) if (pred_n > 0).any() else math.nan


def _macro_recall(t: np.ndarray, p: np.ndarray, k: int) -> float:
    tp = np.bincount(t[t == p], minlength=k)
    true_n = np.bincount(t, minlength=k)
    return float(np.mean(tp[true_n > 0] / true_n[true_n > 0])) if (true_n > 0).any() else math.nan


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of binary ``y`` (bool) by ``score``: the Mann-Whitney U statistic over n1*n0, exact.

    Each positive counts the negatives scored below it, and half of those tied with it (what
    average ranks give): two binary searches of its score in the sorted negatives' scores. Integer
    counts summed exactly, one division; the memory is the two sorted score arrays (no index or
    rank arrays), the searches go a block of positives at a time.
    """
    y = np.asarray(y, dtype=bool)
    positives, negatives = np.sort(score[y]), np.sort(score[~y])
    n1, n0 = len(positives), len(negatives)
    if n1 == 0 or n0 == 0:
        return math.nan
    twice_u = 0  # 2 U: below counts twice, ties once (an integer, exact at any n)
    for i in range(0, n1, _LOSS_STEP):
        block = positives[i:i + _LOSS_STEP]
        twice_u += int(np.searchsorted(negatives, block, side="left").sum())
        twice_u += int(np.searchsorted(negatives, block, side="right").sum())
    return float(twice_u / 2 / (n1 * n0))


#: Rows per step of a full-data log loss (its temporaries are a few arrays of this many rows).
_LOSS_STEP = 1 << 20


def _probability_figures(t: np.ndarray, classes: list[str], probabilities: pd.DataFrame, seed: int) -> list[Figure]:
    """ROC AUC and log loss of the true classes ``t`` (codes into ``classes``) by ``probabilities``
    (one column per class, named by its text; one column: the positive class of a binary model)."""
    names = [str(c) for c in probabilities.columns]
    probs = probabilities.to_numpy(dtype=float)
    index = {c: i for i, c in enumerate(classes)}
    column_class = np.array([index.get(c, -1) for c in names], dtype=np.int64)  # -1: a class never seen
    known = np.isfinite(probs).all(axis=1)
    if len(names) > 1:
        known &= np.isin(t, column_class[column_class >= 0])  # a label outside the columns has no score
    if not known.all():
        t, probs = t[known], probs[known]
    n = len(t)
    if n == 0:
        return []
    if len(names) == 1:
        # One probability column: that of the positive class of a binary model.
        score = probs[:, 0]
        probs = np.stack([1 - score, score], axis=1)
        onehot = np.stack([t != column_class[0], t == column_class[0]], axis=1)
    else:
        onehot = t[:, None] == column_class[None, :]
    figures = []
    # A binary model's AUC is that of the positive (last) column; the other is its mirror image.
    columns = [onehot.shape[1] - 1] if onehot.shape[1] == 2 else list(range(onehot.shape[1]))

    def roc(idx: np.ndarray | None) -> float:
        values = [auc(onehot[:, j] if idx is None else onehot[idx, j], probs[:, j] if idx is None else probs[idx, j])
                  for j in columns]
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else math.nan

    def losses(rows: np.ndarray, truth: np.ndarray) -> np.ndarray:
        p = np.clip(rows, _EPS, 1 - _EPS)
        return -np.log(p[truth] / p.sum(axis=1))

    def log_loss(idx: np.ndarray) -> float:
        return float(np.mean(losses(probs[idx], onehot[idx])))

    value = roc(None)
    if np.isfinite(value):
        figures.append(Figure("roc_auc", value, *bootstrap(roc, n, seed=seed, full=value), n, "bootstrap"))
    if onehot.any(axis=1).all():
        total = sum(float(np.sum(losses(probs[i:i + _LOSS_STEP], onehot[i:i + _LOSS_STEP])))
                    for i in range(0, n, _LOSS_STEP))
        figures.append(Figure("log_loss", total / n, *bootstrap(log_loss, n, seed=seed, full=total / n), n,
                              "bootstrap"))
    return figures


def regression_figures(prediction: pd.Series, label: pd.Series, *, seed: int = 0) -> list[Figure]:
    """MAE, RMSE, R² and MAPE (over the rows whose target is not zero) with bootstrap intervals."""
    y_pred = pd.to_numeric(prediction, errors="coerce").to_numpy(dtype=float)
    y_true = pd.to_numeric(label, errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(y_pred) & np.isfinite(y_true)
    y_pred, y_true = y_pred[ok], y_true[ok]
    n = len(y_true)
    if n == 0:
        return []
    err = y_pred - y_true

    def mae(idx: np.ndarray) -> float:
        return float(np.mean(np.abs(err[idx])))

    def rmse(idx: np.ndarray) -> float:
        return float(math.sqrt(np.mean(err[idx] ** 2)))

    def r2(idx: np.ndarray) -> float:
        total = np.sum((y_true[idx] - y_true[idx].mean()) ** 2)
        return float(1 - np.sum(err[idx] ** 2) / total) if total > 0 else math.nan

    figures = [Figure("mae", mae(np.arange(n)), *bootstrap(mae, n, seed=seed), n, "bootstrap"),
               Figure("rmse", rmse(np.arange(n)), *bootstrap(rmse, n, seed=seed), n, "bootstrap")]
    value = r2(np.arange(n))
    if np.isfinite(value):
        figures.append(Figure("r2", value, *bootstrap(r2, n, seed=seed), n, "bootstrap"))
    # MAPE is undefined where the target is 0: those rows are left out, and n says how many remain.
    nonzero = np.abs(y_true) > _EPS
    m = int(nonzero.sum())
    if m:
        ape = np.abs(err[nonzero] / y_true[nonzero])

        def mape(idx: np.ndarray) -> float:
            return float(np.mean(ape[idx]))

        figures.append(Figure("mape", mape(np.arange(m)), *bootstrap(mape, m, seed=seed), m, "bootstrap"))
    return figures


def quality_figures(task: str, prediction: pd.Series, label: pd.Series,
                    probabilities: pd.DataFrame | None = None, *, seed: int = 0) -> list[Figure]:
    """The figures of ``task`` (``classification`` or ``regression``)."""
    if task == "regression":
        return regression_figures(prediction, label, seed=seed)
    return classification_figures(prediction, label, probabilities, seed=seed)


# --- two versions on different rows (the canary's `quality` check) -------------------------------


@dataclass(frozen=True)
class Difference:
    """How much worse ``b`` is than ``a`` (positive = worse, in the figure's own direction), with a
    95 % interval and the name of the method behind it."""

    value: float
    low: float
    high: float
    test: str


def newcombe_difference(hits_a: int, n_a: int, hits_b: int, n_b: int, z: float = Z95) -> Difference:
    """``hits_a/n_a - hits_b/n_b`` (how much lower ``b``'s proportion is) with Newcombe's hybrid score
    interval (Newcombe 1998, method 10: built from each side's Wilson interval; right coverage at
    small n and near 0 or 1, unlike the Wald interval of a two-proportion z-test). Independent rows."""
    if n_a == 0 or n_b == 0:
        raise ValueError("both sides need at least one row")
    p_a, p_b = hits_a / n_a, hits_b / n_b
    low_a, high_a = wilson(hits_a, n_a, z)
    low_b, high_b = wilson(hits_b, n_b, z)
    d = p_a - p_b
    return Difference(d, d - math.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2),
                      d + math.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2),
                      "Newcombe hybrid score interval (difference of two proportions)")


def welch_difference(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int,
                     confidence: float = 0.95) -> Difference:
    """``mean_b - mean_a`` (how much higher ``b``'s mean absolute error is) with Welch's t interval
    (unequal variances, Welch-Satterthwaite degrees of freedom). Independent rows; ``sd_*`` are
    sample standard deviations (ddof = 1)."""
    from scipy.stats import t as student_t

    if n_a < 2 or n_b < 2:
        raise ValueError("both sides need at least two rows")
    d = mean_b - mean_a
    va, vb = sd_a ** 2 / n_a, sd_b ** 2 / n_b
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(d, d, d, "Welch's t interval on absolute errors")
    df = (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))
    half = float(student_t.ppf(0.5 + confidence / 2, df)) * se
    return Difference(d, d - half, d + half, "Welch's t interval on absolute errors")
