"""Drift benchmark: our job path vs Evidently's DataDriftPreset on the same data.

Two modes (``--mode``; ``auto``: ``disk`` from 1M rows on, ``memory`` below):

* ``disk`` (issue 10, "drift at scale"): the data is first written as files, untimed and in chunks of
  ``--chunk-rows`` (the generator stays within memory): the current window as capture-layout Parquet
  (``{deployment}/capture/date=YYYY-MM-DD/part-*.parquet``, meta columns + the 25 inputs, plus 1 %
  noise rows the job must leave out: failed requests and another version, with absurd values) in a
  deployment's state folder, and the reference as a folder of Parquet files given as
  ``-C reference_data``. Then the real job, ``run_deployment_drift`` (it opens the capture and the
  reference and reads them one column at a time), runs in a fresh subprocess: wall time of the job
  (Evidently's import included, as the job pays it), wall time of the whole subprocess (Python start,
  imports, store setup) and its peak RSS (``VmHWM``). The model version has no loadable model, so
  prediction drift is skipped (said in the output); the 25 input columns are what is judged.
  The verdicts are checked by an independent computation, in another subprocess, one column at a
  time: each column read with pyarrow (rows selected by a pyarrow filter, not by our code), then
  ``scipy.stats.ks_2samp`` (numeric) or ``scipy.stats.chi2_contingency`` on ``pyarrow.compute``
  counts (categorical). Evidently (b) runs on the same files, read whole into memory (untimed), up to
  1M rows (``--with-evidently-full`` above: it would need ~20 GB at 10M). Goals printed: job <= 60 s,
  peak RSS <= 1 GB, verdicts identical.
* ``memory`` (below): the frames are built in memory and passed to ``run_drift_report``, as follows.

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

Each measurement runs in a fresh subprocess so peak RSS (``VmHWM``) belongs to it alone; the
data is generated there too and Evidently is imported before the clock starts (its ~5 s import is
reported apart). Finally our per-column verdicts are checked against an independent computation on
all rows: ``scipy.stats.ks_2samp`` and ``scipy.stats.chi2_contingency`` (on ``pd.crosstab``).

    .venv/bin/python benchmarks/drift.py --rows 100000,1000000
    .venv/bin/python benchmarks/drift.py --rows 10000000          # disk mode: the issue-10 goals
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import procfs  # benchmarks/procfs.py

REPO = Path(__file__).resolve().parents[1]
SHIFTED = ["num_03", "num_11", "cat_2"]
CAT_LEVELS = [3, 5, 8, 12, 30]
EVIDENTLY_FULL_MAX_ROWS = 1_000_000
DISK_MODE_MIN_ROWS = 1_000_000
GOAL_SECONDS, GOAL_MB = 60.0, 1024.0
WINDOW_START = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW_END = WINDOW_START + timedelta(hours=1)


def _numeric_columns(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """The 20 numeric columns of assorted shapes (normal, lognormal, uniform, gamma, Poisson)."""
    cols: dict[str, np.ndarray] = {}
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
    return cols


def make_frame(n: int, seed: int, shifted: bool) -> pd.DataFrame:
    """25 columns of one fixed distribution (shifted in SHIFTED when ``shifted``)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {}
    cols.update(_numeric_columns(rng, n))
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
    """This process's own peak RSS (VmHWM: ``procfs.peak_rss_bytes``): the child spawned by the parent
    that has just written the files (~600 MB) reports its own, not at least the parent's."""
    return procfs.peak_rss_bytes() / 2**20


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
    return _evidently(make_frame(rows, 1, False), make_frame(rows, 2, True))


def _evidently(reference: pd.DataFrame, current: pd.DataFrame) -> dict:
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


# ---------------------------------------------------------------------------------------------
# disk mode


def make_chunk(n: int, seed: int, shifted: bool) -> dict[str, object]:
    """``make_frame``'s 25 columns as Arrow arrays, for ``n`` rows of one chunk. The shifts use the
    distributions' own mean/sd (not the chunk's), so every chunk carries the same shift."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {}
    cols.update(_numeric_columns(rng, n))
    if shifted:
        cols["num_03"] = np.asarray(cols["num_03"]) + 0.05 * np.sqrt(2.0 * 25.0)  # gamma(2, 5): sd 7.07
        mean = float(np.exp(3 + 0.7 ** 2 / 2))  # lognormal(3, 0.7)
        cols["num_11"] = mean + (np.asarray(cols["num_11"]) - mean) * 1.05
    out: dict[str, object] = {name: pa.array(values) for name, values in cols.items()}
    for j, k in enumerate(CAT_LEVELS):
        p = 1.0 / np.arange(1, k + 1)
        p /= p.sum()
        if shifted and j == 2:
            p = p.copy()
            p[0] -= 0.02
            p[-1] += 0.02
        levels = pa.array([f"c{j}_{v}" for v in range(k)])
        out[f"cat_{j}"] = pc.take(levels, pa.array(rng.choice(k, n, p=p).astype(np.int32)))  # plain text
    return out


def _paths(tmp: Path) -> tuple[Path, Path, Path]:
    """(state home, the deployment's capture folder, the reference folder)."""
    from mlflow_deploy_plugin.state import StateStore

    home = tmp / "home"
    return home, StateStore(home).paths("bench").capture, tmp / "reference"


def write_files(tmp: Path, rows: int, chunk_rows: int) -> dict:
    """The current window (capture layout, + 1 % noise rows) and the reference, chunk by chunk."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mlflow_deploy_plugin.capture.layout import META_SCHEMA
    from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef
    from mlflow_deploy_plugin.state import StateStore

    home, capture, reference = _paths(tmp)
    day = capture / f"date={WINDOW_START:%Y-%m-%d}"
    day.mkdir(parents=True)
    reference.mkdir()
    noise_rows = rows // 100
    total = rows + noise_rows
    stamps = np.linspace(0, 3599.999, total)  # seconds into the window
    order = np.random.default_rng(3).permutation(total) < noise_rows  # noise rows spread over the window
    written = 0
    for k, start in enumerate(range(0, total, chunk_rows)):
        n = min(chunk_rows, total - start)
        noise = order[start:start + n]
        data = make_chunk(n, 2_000 + k, True)
        data["num_00"] = pa.array(np.where(noise, 1e6, np.asarray(data["num_00"])))  # leaks would show
        base = np.datetime64(WINDOW_START.replace(tzinfo=None), "us")
        meta = {
            "_request_id": pc.cast(pa.array(np.arange(start, start + n)), pa.string()),
            "_timestamp": pa.array(base + (stamps[start:start + n] * 1e6).astype("timedelta64[us]"),
                                   pa.timestamp("us", tz="UTC")),
            "_deployment": pa.array(["bench"] * n),
            "_model_version": pa.array(np.where(noise & (np.arange(n) % 2 == 0), "2", "1")),
            "_status": pa.array(np.where(noise & (np.arange(n) % 2 == 1), 500, 200).astype(np.int16)),
            "_latency_ms": pa.array(np.full(n, 2.5, np.float32)),
            "_row": pa.array(np.zeros(n, np.int32)),
            "_role": pa.array(["primary"] * n),
            "_model_name": pa.array(["bench"] * n),
        }
        table = pa.table({**{f.name: meta[f.name].cast(f.type) for f in META_SCHEMA}, **data})
        pq.write_table(table, day / f"part-{k:05d}.parquet")
        written += int((~noise).sum())
        del table, data, meta
    for k, start in enumerate(range(0, rows, chunk_rows)):
        n = min(chunk_rows, rows - start)
        pq.write_table(pa.table(make_chunk(n, 1_000 + k, False)), reference / f"part-{k:05d}.parquet")
    StateStore(home).write_spec(DeploymentSpec("bench", ModelRef("models:/bench/1", "bench", "1"),
                                               DeploymentConfig(reference_data=str(reference))))
    size = sum(f.stat().st_size for f in tmp.rglob("*.parquet")) / 2**20
    return {"current_rows": written, "noise_rows": total - written, "reference_rows": rows, "mb_on_disk": size}


def child_store_disk(tmp: Path) -> dict:
    """The tracking store the job reports to, made beforehand (a job meets an existing store: creating
    its tables imports and runs the migrations, ~400 MB that are no part of a drift job)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    client = mlflow.MlflowClient()
    client.create_registered_model("bench")
    client.create_model_version("bench", source=f"{tmp}/no-model")  # nothing to load: no prediction drift
    return {}


def child_ours_disk(tmp: Path) -> dict:
    """The real job on the files: ``run_deployment_drift`` (the clock starts after the imports)."""
    import mlflow

    from mlflow_deploy_plugin.monitoring.deployment_drift import run_deployment_drift
    from mlflow_deploy_plugin.state import StateStore

    home, _, _ = _paths(tmp)
    os.chdir(tmp)
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    client = mlflow.MlflowClient()
    setup_mb = _peak_mb()
    marks: list[tuple[str, float]] = []
    started = time.perf_counter()
    outcome = run_deployment_drift("bench", WINDOW_START, WINDOW_END, store=StateStore(home),
                                   progress=lambda msg: marks.append((msg.split(" ")[0], time.perf_counter())))
    total = time.perf_counter() - started
    peak = _peak_mb()
    steps = {name: round(nxt - at, 2) for (name, at), (_, nxt) in zip(marks, marks[1:], strict=False)}
    html_mb = Path(client.download_artifacts(outcome.run_id, "drift_report.html", str(tmp))).stat().st_size / 2**20
    assert outcome.result is not None
    verdicts = {c.name: [c.kind, c.method, c.statistic, c.score, c.significant] for c in outcome.result.columns}
    return {"seconds": total, "steps": steps, "peak_mb": peak, "setup_peak_mb": setup_mb,
            "drifted": outcome.result.drifted_columns, "status": outcome.status, "html_mb": html_mb,
            "rows_current": outcome.rows_current, "rows_reference": outcome.rows_reference,
            "rows": outcome.summary["rows"], "skipped": outcome.summary["skipped"],
            "evidently": {k: v for k, v in outcome.summary["evidently"].items() if k.startswith("sample")},
            "verdicts": verdicts}


def child_verify_disk(tmp: Path) -> dict:
    """Independent statistics, one column at a time: pyarrow reads and filters, scipy tests."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from scipy import stats

    _, capture, reference = _paths(tmp)
    cur_ds, ref_ds = ds.dataset(capture, format="parquet"), ds.dataset(reference, format="parquet")
    served = ((ds.field("_status") == 200) & (ds.field("_model_version") == "1")
              & (ds.field("_timestamp") < pa_scalar_end()))
    expected: dict[str, list[float]] = {}
    for name in ref_ds.schema.names:
        ref = ref_ds.to_table(columns=[name]).column(0)
        cur = cur_ds.to_table(columns=[name], filter=served).column(0)
        if name.startswith("num_"):
            res = stats.ks_2samp(ref.to_numpy().astype(float), cur.to_numpy().astype(float))
        else:
            rc, cc = (dict(zip(c.field("values").to_pylist(), c.field("counts").to_pylist(), strict=True))
                      for c in (pc.value_counts(ref), pc.value_counts(cur)))
            keys = sorted(set(rc) | set(cc))
            res = stats.chi2_contingency(np.array([[rc.get(k, 0) for k in keys], [cc.get(k, 0) for k in keys]]),
                                         correction=False)
        expected[name] = [float(res.statistic), float(res.pvalue), len(cur)]
        del ref, cur
    return {"expected": expected}


def pa_scalar_end():  # noqa: ANN201 - a pyarrow scalar
    import pyarrow as pa

    return pa.scalar(WINDOW_END, pa.timestamp("us", tz="UTC"))


def compare(verdicts: dict, expected: dict) -> dict:
    """Our verdicts vs the independent figures: method, significance at 0.05, relative differences."""
    mismatches, max_rel = [], 0.0
    for name, (kind, method, statistic, score, significant) in verdicts.items():
        if method != ("ks" if kind == "numeric" else "chi2") or kind != ("numeric" if name.startswith("num_")
                                                                           else "categorical"):
            mismatches.append(f"{name} (kind {kind}, method {method})")
            continue
        expected_stat, expected_p, _ = expected[name]
        if (expected_p < 0.05) != significant:
            mismatches.append(name)
        for ours, theirs in ((statistic, expected_stat), (score, expected_p)):
            if theirs > 1e-250:  # relative error of p-values underflowing to ~0 is meaningless
                max_rel = max(max_rel, abs(ours - theirs) / abs(theirs))
    missing = sorted(set(expected) - set(verdicts))
    return {"columns": len(verdicts), "verdict_mismatches": mismatches + [f"{m} (not judged)" for m in missing],
            "max_rel_diff": max_rel}


def child_evidently_disk(tmp: Path) -> dict:
    """Evidently's DataDriftPreset on the same rows, read whole into memory first (untimed)."""
    import pyarrow.dataset as ds

    _, capture, reference_dir = _paths(tmp)
    reference = ds.dataset(reference_dir, format="parquet").to_table().to_pandas()
    served = (ds.field("_status") == 200) & (ds.field("_model_version") == "1")
    current = ds.dataset(capture, format="parquet").to_table(columns=list(reference.columns), filter=served).to_pandas()
    return _evidently(reference, current)


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def _run_child(kind: str, rows: int, sample_rows: int, tmp: Path | None = None) -> dict:
    extra = ["--_dir", str(tmp)] if tmp is not None else []
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--_child", kind, "--rows", str(rows),
                           "--sample-rows", str(sample_rows), *extra], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "child_wall_s": wall}


def run_disk(rows: int, args: argparse.Namespace) -> bool:
    """One size in disk mode; True when a goal or the verdict check failed."""
    with tempfile.TemporaryDirectory(prefix="drift-bench-") as name:
        tmp = Path(name)
        started = time.perf_counter()
        files = write_files(tmp, rows, args.chunk_rows)
        print(f"\n== {rows:,} current x {rows:,} reference rows, from Parquet on disk ==")
        print(f"files written (untimed) in {time.perf_counter() - started:.0f} s: {files['mb_on_disk']:.0f} MB; "
              f"capture {files['current_rows']:,} rows of the version + {files['noise_rows']:,} noise rows, "
              f"reference {files['reference_rows']:,} rows")
        _run_child("store-disk", rows, args.sample_rows, tmp)
        load = _load()
        ours = _run_child("ours-disk", rows, args.sample_rows, tmp)
        print(f"(a) ours, run_deployment_drift streaming one column at a time ({load} before): "
              f"job {ours['seconds']:.1f} s {ours['steps']}, whole subprocess {ours['child_wall_s']:.1f} s "
              f"(Python start, imports), peak RSS {ours['peak_mb']:.0f} MB "
              f"({ours['setup_peak_mb']:.0f} MB before the job), HTML {ours['html_mb']:.1f} MB from "
              f"{ours['evidently']}; {_load()} after")
        print(f"    rows judged: {ours['rows']}; verdict {ours['status']}, drifted {ours['drifted']} (injected, small, "
              f"under the effect floors: {SHIFTED}); skipped: {ours['skipped']}")
        verify = _run_child("verify-disk", rows, args.sample_rows, tmp)
        check = compare(ours["verdicts"], verify["expected"])
        rows_ok = all(int(v[2]) == ours["rows_current"] for v in verify["expected"].values())
        print(f"    vs scipy ks_2samp / chi2_contingency on all rows, column by column "
              f"({verify['child_wall_s']:.0f} s): {check['columns']} columns, verdict mismatches "
              f"{check['verdict_mismatches'] or 'none'}, max relative diff {check['max_rel_diff']:.1e}, "
              f"same rows: {rows_ok}")
        identical = not check["verdict_mismatches"] and check["max_rel_diff"] <= 1e-6 and rows_ok
        goals = {"job <= 60 s": ours["seconds"] <= GOAL_SECONDS,
                 "peak RSS <= 1 GB": ours["peak_mb"] <= GOAL_MB, "verdicts identical": identical}
        print("    goals: " + ", ".join(f"{goal}: {'met' if ok else 'NOT met'}" for goal, ok in goals.items())
              + f" (whole subprocess {ours['child_wall_s']:.1f} s)")
        if rows > EVIDENTLY_FULL_MAX_ROWS and not args.with_evidently_full:
            print(f"(b) Evidently DataDriftPreset on all rows: skipped above {EVIDENTLY_FULL_MAX_ROWS:,} rows "
                  "(--with-evidently-full to run it)")
        else:
            load = _load()
            theirs = _run_child("evidently-disk", rows, args.sample_rows, tmp)
            print(f"(b) Evidently DataDriftPreset on the same rows + save_html ({load} before): "
                  f"{theirs['seconds']:.1f} s, peak RSS {theirs['peak_mb']:.0f} MB "
                  f"(+{theirs['peak_mb'] - theirs['base_mb']:.0f} MB over data+imports), HTML {theirs['html_mb']:.1f} MB; "
                  f"its import ({theirs['import_evidently_s']:.1f} s) not counted, ours counts it")
            print(f"    ratio ours/theirs: time {ours['seconds'] / theirs['seconds']:.2f}, "
                  f"peak RSS {ours['peak_mb'] / theirs['peak_mb']:.2f}")
        return not all(goals.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000", help="comma-separated row counts per frame")
    parser.add_argument("--sample-rows", type=int, default=20_000, help="rows per frame Evidently renders in (a)")
    parser.add_argument("--with-evidently-full", action="store_true",
                        help=f"run (b) above {EVIDENTLY_FULL_MAX_ROWS:,} rows too (minutes, GBs)")
    parser.add_argument("--mode", choices=["auto", "disk", "memory"], default="auto",
                        help=f"disk: from Parquet files, streamed (auto: from {DISK_MODE_MIN_ROWS:,} rows on)")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows per written file (disk mode)")
    parser.add_argument("--_child", choices=["ours", "evidently", "store-disk", "ours-disk", "verify-disk",
                                                "evidently-disk"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        rows = int(args.rows)
        children = {"ours": lambda: child_ours(rows, args.sample_rows), "evidently": lambda: child_evidently(rows),
                    "store-disk": lambda: child_store_disk(Path(args._dir)),
                    "ours-disk": lambda: child_ours_disk(Path(args._dir)),
                    "verify-disk": lambda: child_verify_disk(Path(args._dir)),
                    "evidently-disk": lambda: child_evidently_disk(Path(args._dir))}
        print(json.dumps(children[args._child]()))
        return

    print(f"cpus={os.cpu_count()} python={sys.version.split()[0]}; 25 columns (20 numeric, 5 categorical), "
          f"shift in {SHIFTED}; (a) includes MLflow logging into a temp SQLite store")
    failed = False
    for rows in (int(r.replace("_", "")) for r in args.rows.split(",")):
        if args.mode == "disk" or (args.mode == "auto" and rows >= DISK_MODE_MIN_ROWS):
            failed |= run_disk(rows, args)
            continue
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
        raise SystemExit("a goal is not met, or verdicts differ from the independent computation")


if __name__ == "__main__":
    main()
