"""Drift benchmark: our job path vs Evidently's DataDriftPreset on the same data.

Data: 25 columns (20 numeric of assorted shapes, 5 categorical object columns of 3-30 levels),
reference and current of N rows each, with a shift injected in 3 columns (``num_03`` mean +0.05 sd,
``num_11`` scale x1.05, ``cat_2`` proportions). These shifts are small on purpose (a speed benchmark):
at volume the tests find them, but they stay under the default effect-size floors, so they are not
drift verdicts; ``benchmarks/drift_quality.py`` measures verdict quality.

(a) ours: the full drift job, ``run_drift_report`` — exact verdicts on all rows (``compute_drift``),
    the Evidently HTML from a random sample (``--sample-rows``, default 20,000 per frame), and MLflow
    logging (params, metrics, HTML + JSON artifacts, version tags) into a temporary SQLite store.
(b) theirs: ``Report([DataDriftPreset()], include_tests=True)`` on all rows + ``save_html`` (Evidently's
    default methods). Skipped above 200k rows unless ``--with-evidently-full`` (it takes minutes).

Each measurement runs in a fresh subprocess so peak RSS (``ru_maxrss``) belongs to it alone; the
data is generated there too and Evidently is imported before the clock starts (its ~5 s import is
reported apart). Finally our per-column verdicts are checked against an independent computation on
all rows: ``scipy.stats.ks_2samp`` and ``scipy.stats.chi2_contingency`` (on ``pd.crosstab``).

    .venv/bin/python benchmarks/drift.py --rows 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHIFTED = ["num_03", "num_11", "cat_2"]
CAT_LEVELS = [3, 5, 8, 12, 30]
EVIDENTLY_FULL_MAX_ROWS = 200_000


def make_frame(n: int, seed: int, shifted: bool) -> pd.DataFrame:
    """25 columns of one fixed distribution (shifted in SHIFTED when ``shifted``)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {}
    for i in range(20):
        shape = i % 5
        if shape == 0:
            values = rng.normal(50, 10, n)
        elif shape == 1:
            values = rng.lognormal(3, 0.7, n)
        elif shape == 2:
            values = rng.uniform(0, 100, n)
        elif shape == 3:
            values = rng.gamma(2.0, 5.0, n)
        else:
            values = rng.poisson(40, n).astype(np.int64)  # integers with ties, >10 levels: numeric
        cols[f"num_{i:02d}"] = values
    if shifted:
        cols["num_03"] = cols["num_03"] + 0.05 * np.std(cols["num_03"])
        num_11 = np.asarray(cols["num_11"], dtype=float)
        cols["num_11"] = num_11.mean() + (num_11 - num_11.mean()) * 1.05
    for j, k in enumerate(CAT_LEVELS):
        p = 1.0 / np.arange(1, k + 1)  # Zipf-like shares
        p /= p.sum()
        if shifted and j == 2:
            p = p.copy()
            p[0] -= 0.02
            p[-1] += 0.02
        levels = np.array([f"c{j}_{v}" for v in range(k)], dtype=object)
        cols[f"cat_{j}"] = levels[rng.choice(k, n, p=p)]
    return pd.DataFrame(cols)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _import_evidently() -> float:
    started = time.perf_counter()
    import evidently.presets  # noqa: F401

    return time.perf_counter() - started


def child_ours(rows: int, sample_rows: int) -> dict:
    import mlflow

    from mlflow_deploy_plugin.monitoring import DriftSettings, run_drift_report

    reference = make_frame(rows, 1, False)
    current = make_frame(rows, 2, True)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    captured = pd.concat([pd.DataFrame({
        "_timestamp": start + pd.to_timedelta(np.linspace(0, 3599, rows), unit="s"),
        "_model_version": np.full(rows, "1", dtype=object), "_status": np.full(rows, 200, dtype=np.int16),
    }), current], axis=1)
    import_s = _import_evidently()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        client = mlflow.MlflowClient()
        client.create_registered_model("bench")
        client.create_model_version("bench", source=f"{tmp}/model")
        client.create_experiment("drift/bench", artifact_location=f"{tmp}/artifacts")
        base = _rss_mb()
        marks: list[tuple[str, float]] = []
        started = time.perf_counter()
        outcome = run_drift_report(
            deployment="bench", model_name="bench", model_version="1", captured=captured, reference=reference,
            reference_source="benchmark", window_start=start, window_end=start + timedelta(hours=1),
            settings=DriftSettings(evidently_sample_rows=sample_rows), client=client,
            progress=lambda msg: marks.append((msg.split(" ")[0], time.perf_counter())),
        )
        total = time.perf_counter() - started
        peak = _peak_mb()
        steps = {}
        for (name, at), (_, nxt) in zip(marks, marks[1:], strict=False):
            steps[name] = round(nxt - at, 2)
        html_mb = Path(client.download_artifacts(outcome.run_id, "drift_report.html", tmp)).stat().st_size / 2**20
        verdicts = {c.name: [c.kind, c.method, c.statistic, c.score, c.significant] for c in outcome.result.columns}
        check = verify(reference, current, verdicts)
    return {"seconds": total, "steps": steps, "peak_mb": peak, "base_mb": base, "import_evidently_s": import_s,
            "drifted": outcome.result.drifted_columns, "status": outcome.status, "html_mb": html_mb,
            "check": check}


def verify(reference: pd.DataFrame, current: pd.DataFrame, verdicts: dict) -> dict:
    """Our tests vs scipy on all rows, column by column (statistic, p-value, significant at 0.05; the
    verdict also needs the effect-size floor, see ``benchmarks/drift_quality.py``)."""
    from scipy import stats

    mismatches, max_rel = [], 0.0
    for name, (kind, method, statistic, score, significant) in verdicts.items():
        if method != ("ks" if kind == "numeric" else "chi2"):
            mismatches.append(f"{name} (method {method})")
        if kind == "numeric":
            res = stats.ks_2samp(reference[name].to_numpy(float), current[name].to_numpy(float))
            expected_stat, expected_p = res.statistic, res.pvalue
        else:
            labels = np.r_[np.zeros(len(reference), np.int8), np.ones(len(current), np.int8)]
            table = pd.crosstab(labels, np.r_[reference[name].to_numpy(), current[name].to_numpy()])
            res = stats.chi2_contingency(table.to_numpy(), correction=False)
            expected_stat, expected_p = res.statistic, res.pvalue
        if (expected_p < 0.05) != significant:
            mismatches.append(name)
        for ours, theirs in ((statistic, expected_stat), (score, expected_p)):
            if theirs > 1e-250:  # relative error of p-values underflowing to ~0 is meaningless
                max_rel = max(max_rel, abs(ours - theirs) / abs(theirs))
    return {"columns": len(verdicts), "verdict_mismatches": mismatches, "max_rel_diff": max_rel}


def child_evidently(rows: int) -> dict:
    reference = make_frame(rows, 1, False)
    current = make_frame(rows, 2, True)
    import_s = _import_evidently()
    import warnings

    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=[c for c in reference.columns if c.startswith("num_")],
                                categorical_columns=[c for c in reference.columns if c.startswith("cat_")])
    base = _rss_mb()
    started = time.perf_counter()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset()], include_tests=True).run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition))
        snapshot.save_html(f"{tmp}/report.html")
        seconds = time.perf_counter() - started
        html_mb = Path(f"{tmp}/report.html").stat().st_size / 2**20
    return {"seconds": seconds, "peak_mb": _peak_mb(), "base_mb": base, "import_evidently_s": import_s,
            "html_mb": html_mb}


def _run_child(kind: str, rows: int, sample_rows: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--_child", kind, "--rows", str(rows),
                           "--sample-rows", str(sample_rows)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000", help="comma-separated row counts per frame")
    parser.add_argument("--sample-rows", type=int, default=20_000, help="rows per frame Evidently renders in (a)")
    parser.add_argument("--with-evidently-full", action="store_true",
                        help=f"run (b) above {EVIDENTLY_FULL_MAX_ROWS:,} rows too (minutes, GBs)")
    parser.add_argument("--_child", choices=["ours", "evidently"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        rows = int(args.rows)
        result = child_ours(rows, args.sample_rows) if args._child == "ours" else child_evidently(rows)
        print(json.dumps(result))
        return

    print(f"cpus={os.cpu_count()} python={sys.version.split()[0]}; 25 columns (20 numeric, 5 categorical), "
          f"shift in {SHIFTED}; (a) includes MLflow logging into a temp SQLite store")
    failed = False
    for rows in (int(r.replace("_", "")) for r in args.rows.split(",")):
        ours = _run_child("ours", rows, args.sample_rows)
        check = ours["check"]
        print(f"\n== {rows:,} rows per frame ==")
        print(f"(a) ours: {ours['seconds']:.1f} s total {ours['steps']}, peak RSS {ours['peak_mb']:.0f} MB "
              f"(+{ours['peak_mb'] - ours['base_mb']:.0f} MB over data+imports), HTML {ours['html_mb']:.1f} MB, "
              f"Evidently import {ours['import_evidently_s']:.1f} s (not counted)")
        false_flags = sorted(set(ours["drifted"]) - set(SHIFTED))
        print(f"    verdict: {ours['status']}, drifted columns {ours['drifted']} (injected, small, under the "
              f"effect floors: {SHIFTED}; flagged beyond them: {false_flags or 'none'})")
        print(f"    vs scipy ks_2samp/chi2_contingency on all rows: {check['columns']} columns, verdict "
              f"mismatches {check['verdict_mismatches'] or 'none'}, max relative diff {check['max_rel_diff']:.1e}")
        failed |= bool(check["verdict_mismatches"]) or check["max_rel_diff"] > 1e-6
        if rows > EVIDENTLY_FULL_MAX_ROWS and not args.with_evidently_full:
            print(f"(b) Evidently DataDriftPreset on all rows: skipped above {EVIDENTLY_FULL_MAX_ROWS:,} rows "
                  "(--with-evidently-full to run it)")
            continue
        theirs = _run_child("evidently", rows, args.sample_rows)
        print(f"(b) Evidently DataDriftPreset on all rows + save_html: {theirs['seconds']:.1f} s, peak RSS "
              f"{theirs['peak_mb']:.0f} MB (+{theirs['peak_mb'] - theirs['base_mb']:.0f} MB), "
              f"HTML {theirs['html_mb']:.1f} MB")
        print(f"    ratio ours/theirs: time {ours['seconds'] / theirs['seconds']:.2f}, peak RSS "
              f"{ours['peak_mb'] / theirs['peak_mb']:.2f}, increment "
              f"{(ours['peak_mb'] - ours['base_mb']) / max(theirs['peak_mb'] - theirs['base_mb'], 1):.2f}")
    if failed:
        raise SystemExit("verdicts differ from the independent computation")


if __name__ == "__main__":
    main()
