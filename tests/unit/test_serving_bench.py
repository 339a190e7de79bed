"""The serving benchmark's pure parts: V2 bodies for MLServer, MLServer's repository files, the cells
and defaults of the command line, and issue 10's goal judge on fixed figures (no servers)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import serving  # noqa: E402  (benchmarks/serving.py)
import serving_goals  # noqa: E402
import serving_mlserver  # noqa: E402


@pytest.fixture
def frame() -> pd.DataFrame:
    values = np.random.default_rng(0).normal(size=(300, 4))
    return pd.DataFrame(values, columns=[f"f{i}" for i in range(4)])


def test_v2_bodies_carry_the_same_rows_as_the_dataframe_split_bodies(frame: pd.DataFrame) -> None:
    mlflow_bodies = serving.make_bodies(frame, 100)
    v2_bodies = serving.make_bodies(frame, 100, "v2")
    assert len(mlflow_bodies) == len(v2_bodies) == serving.BODIES_PER_SHAPE
    for plain, v2 in zip(mlflow_bodies, v2_bodies, strict=True):
        split = json.loads(plain)["dataframe_split"]
        inputs = json.loads(v2)["inputs"]
        assert [tensor["name"] for tensor in inputs] == split["columns"]
        assert all(tensor["shape"] == [100, 1] and tensor["datatype"] == "FP64" for tensor in inputs)
        rebuilt = [list(row) for row in zip(*(tensor["data"] for tensor in inputs), strict=True)]
        assert rebuilt == split["data"]


def test_v2_predictions_flatten_the_one_output_and_refuse_several() -> None:
    answer = {"model_name": "m", "outputs": [{"name": "output-1", "shape": [3, 1], "datatype": "INT64",
                                              "data": [0, 1, 1]}]}
    assert serving_mlserver.v2_predictions(answer) == [0, 1, 1]
    answer["outputs"].append({"name": "output-2", "shape": [3, 1], "datatype": "INT64", "data": [1, 1, 1]})
    with pytest.raises(ValueError, match="one output"):
        serving_mlserver.v2_predictions(answer)


def test_mlserver_repository_batches_only_when_asked(tmp_path: Path) -> None:
    for batching in (False, True):
        folder = serving_mlserver.write_repository(tmp_path / str(batching), tmp_path / "model", port=1, grpc_port=2,
                                                   metrics_port=3, workers=1, batching=batching)
        settings = json.loads((folder / "settings.json").read_text())
        model = json.loads((folder / "model-settings.json").read_text())
        assert settings["debug"] is False  # no access log, as for the other servers
        assert (settings["http_port"], settings["grpc_port"], settings["metrics_port"]) == (1, 2, 3)
        assert settings["parallel_workers"] == 1
        assert model["implementation"] == "mlserver_mlflow.MLflowRuntime"
        assert model["parameters"]["uri"] == str(tmp_path / "model")
        assert (model.get("max_batch_size"), model.get("max_batch_time")) == ((32, 0.002) if batching else (None, None))


def test_default_run_is_the_issue_s_cells_two_passes_and_capture_off_beside() -> None:
    args = serving.parse_args([])
    assert args.cells == [(1, 1), (1, 8), (1, 32), (1, 64), (100, 32)]
    assert args.passes == 2
    assert args.ours_variant == ["nocap:capture=false"]
    assert not args.no_mlserver
    assert serving.parse_args(["--no-nocap"]).ours_variant == []
    assert serving.parse_args(["--ours-variant", "nocap:capture=false,workers=1"]).ours_variant == [
        "nocap:capture=false,workers=1"]
    assert serving.parse_args(["--rows", "1,100", "--concurrency", "1,8"]).cells == [(1, 1), (1, 8), (100, 1), (100, 8)]
    assert serving.parse_args(["--cells", "10x4"]).cells == [(10, 4)]
    with pytest.raises(SystemExit):
        serving.parse_args(["--cells", "1x0"])


def _cell(server: str, rows: int, conc: int, rps: float, p99: float, max_ms: float | None = None) -> dict[str, Any]:
    return {"server": server, "rows": rows, "concurrency": conc, "rps": rps, "p99_ms": p99,
            "max_ms": p99 * 1.5 if max_ms is None else max_ms}


def _report(results: list[dict[str, Any]], ours_pss: float = 300.0) -> dict[str, Any]:
    def server(name: str, pss: float, cold: float) -> dict[str, Any]:
        return {"name": name, "cold_start_s": cold, "memory": {"after load": {"pss_mb": pss, "rss_mb": pss,
                                                                              "processes": 1}}}
    servers = [server("peer", 400.0, 5.0), server("mlserver", 410.0, 4.0), server("mlserver-batch", 412.0, 4.1),
               {**server("ours", ours_pss, 2.5), "create_cli_s": 2.8}, server("ours-nocap", 260.0, 2.4)]
    return {"results": results, "servers": servers}


def _verdicts(report: dict[str, Any]) -> dict[str, bool | None]:
    return {goal["goal"]: goal["met"] for goal in serving_goals.judge(report)}


def test_goal_judge_on_fixed_figures() -> None:
    results = [
        # c=1: capture costs 2%, p99 1.4x capture off and under both MLServers, max 15 ms
        _cell("peer", 1, 1, 200, 30), _cell("mlserver", 1, 1, 150, 8), _cell("mlserver-batch", 1, 1, 140, 10),
        _cell("ours", 1, 1, 490, 4.2, max_ms=15), _cell("ours-nocap", 1, 1, 500, 3.0),
        # 1 row, c=32: 12x the peer but only 2x MLServer-batching; capture costs 10%; p99 fine
        _cell("peer", 1, 32, 200, 340), _cell("mlserver", 1, 32, 900, 140), _cell("mlserver-batch", 1, 32, 1200, 120),
        _cell("ours", 1, 32, 2400, 20), _cell("ours-nocap", 1, 32, 2700, 18),
        # 100 rows, c=32: 2.5x MLServer-batching; p99 above 1/2 of the plain MLServer's
        _cell("peer", 100, 32, 180, 380), _cell("mlserver", 100, 32, 600, 60),
        _cell("mlserver-batch", 100, 32, 700, 150), _cell("ours", 100, 32, 1750, 40),
        _cell("ours-nocap", 100, 32, 1780, 39),
    ]
    verdicts = _verdicts(_report(results))
    assert verdicts == {
        "capture costs <= 5% of throughput in every cell": False,
        "p99 at c=1 with capture <= 1.5x capture off": True,
        "p99 at c=1 with capture <= MLServer's": True,
        "max latency <= 20 ms at c=1 (capture on)": True,
        "1-row c=32 throughput >= 10x mlflow models serve": True,
        "1-row c=32 throughput >= 2.5x MLServer 1.7.1, adaptive batching (32, 2 ms)": False,
        "100-row c=32 throughput >= 2x MLServer 1.7.1, adaptive batching (32, 2 ms)": True,
        "p99 at c>=8 <= 1/5 of mlflow models serve's": True,
        # 40 ms against the plain MLServer's 60: the better MLServer of the cell counts
        "p99 at c>=8 <= 1/2 of MLServer's": False,
        "memory (PSS, whole deployment) <= the lightest peer": True,
        "cold start: first 200 <= 3.0 s, create returns <= 0.5 s after (this run's model)": True,
    }
    assert _verdicts(_report(results, ours_pss=401.0))["memory (PSS, whole deployment) <= the lightest peer"] is False


def test_goals_without_their_servers_are_not_judged() -> None:
    results = [_cell("peer", 1, 32, 200, 340), _cell("ours", 1, 32, 2400, 20)]
    report = _report(results)
    report["servers"] = [s for s in report["servers"] if s["name"] in ("peer", "ours")]
    verdicts = _verdicts(report)
    assert verdicts["1-row c=32 throughput >= 10x mlflow models serve"] is True
    assert verdicts["capture costs <= 5% of throughput in every cell"] is None
    assert verdicts["1-row c=32 throughput >= 2.5x MLServer 1.7.1, adaptive batching (32, 2 ms)"] is None
    assert verdicts["p99 at c>=8 <= 1/2 of MLServer's"] is None
    assert verdicts["max latency <= 20 ms at c=1 (capture on)"] is None


def test_table_has_a_column_per_server_and_the_figures_of_each_cell() -> None:
    results = [_cell("ours", 1, 1, 490, 4.2, max_ms=15), _cell("peer", 1, 1, 200, 30)]
    report = _report(results)
    lines = serving_goals.table(report)
    assert lines[0].startswith("| cell | mlflow models serve | MLServer 1.7.1 |")
    assert "| 1 row, c=1 | 200 · 30.0 |  |  | 490 · 4.2 |  |" in lines
    assert any(line.startswith("| max latency, 1 row, c=1 |") and "15.0 ms" in line for line in lines)
    assert any("2.5 s (create returns at 2.8 s)" in line for line in lines)
    assert any(line.startswith("| memory (PSS, after load) |") and "300 MiB" in line for line in lines)


def test_a_cell_that_completed_nothing_leaves_its_goals_unjudged() -> None:
    results = [_cell("peer", 1, 32, 200, 340), _cell("mlserver-batch", 1, 32, 0, math.nan),
               _cell("ours", 1, 32, 2400, 20)]
    verdicts = _verdicts(_report(results))
    assert verdicts["1-row c=32 throughput >= 2.5x MLServer 1.7.1, adaptive batching (32, 2 ms)"] is None
    assert verdicts["p99 at c>=8 <= 1/2 of MLServer's"] is None
    assert verdicts["1-row c=32 throughput >= 10x mlflow models serve"] is True
    assert serving_goals.empty_cells(results) == ["mlserver-batch 1r c=32"]


def test_shadow_ratio_takes_each_on_cell_against_its_neighbours_and_the_median() -> None:
    def cell(p99: float, rps: float) -> dict[str, Any]:
        return {"rows": 1, "concurrency": 8, "p99_ms": p99, "rps": rps}

    # off 10, on 12, off 14, on 11, off 8, on 30, off 10: ratios 12/12, 11/11, 30/9
    point = [cell(10, 100), cell(12, 90), cell(14, 100), cell(11, 100), cell(8, 100), cell(30, 50), cell(10, 100)]
    ratio = serving.shadow_ratio(point)
    assert ratio["p99_on_over_off_each"] == pytest.approx([1.0, 1.0, 30 / 9])
    assert ratio["p99_on_over_off"] == pytest.approx(1.0)  # one bad on cell does not decide
    assert ratio["rps_on_over_off"] == pytest.approx(0.9)
    assert (ratio["p99_on_ms"], ratio["p99_off_ms"]) == (12, 11)


def _figures(cpu_s: float, voluntary: float, involuntary: float, runq_s: float, main_share: float) -> dict[str, float]:
    return {"cpu_s": cpu_s, "voluntary": voluntary, "involuntary": involuntary, "run_s": cpu_s, "runq_s": runq_s,
            "main_run_s": cpu_s * main_share, "main_runq_s": runq_s * main_share, "main_voluntary": voluntary * main_share}


def test_per_role_charges_each_kind_of_process_per_request() -> None:
    before = {10: _figures(1.0, 100, 10, 0.5, 0.5), 11: _figures(2.0, 0, 0, 0, 1.0), 12: _figures(5.0, 0, 0, 0, 1.0),
              13: _figures(0.1, 0, 0, 0, 1.0)}
    # 10 and 11 are two workers; 12 exited in the window; 14 (a converter started again) is new.
    after = {10: _figures(1.3, 300, 20, 0.6, 0.5), 11: _figures(2.1, 100, 0, 0.1, 1.0),
             13: _figures(0.1, 0, 0, 0, 1.0), 14: _figures(0.02, 4, 2, 0.001, 1.0)}
    roles = {10: "worker", 11: "worker", 12: "worker", 13: "supervisor", 14: "converter"}
    out = serving.per_role(before, after, roles, requests=2000, duration=2.0)
    worker = out["worker"]
    assert worker["processes"] == 2 and worker["exited"] == 1
    assert worker["cpu_us_per_req"] == pytest.approx(0.4 / 2000 * 1e6)  # 200 µs per request
    assert worker["cpu_pct"] == pytest.approx(20.0)
    assert worker["vol_per_1k"] == pytest.approx(300 / 2)
    assert worker["invol_per_1k"] == pytest.approx(10 / 2)
    assert worker["runq_us_per_req"] == pytest.approx(0.2 / 2000 * 1e6)
    # pid 10's other threads ran half its 0.3 s; pid 11 ran on its main thread only.
    assert worker["threads_us_per_req"] == pytest.approx(0.15 / 2000 * 1e6)
    assert out["converter"]["cpu_us_per_req"] == pytest.approx(10.0)  # counted from zero
    assert out["supervisor"]["cpu_us_per_req"] == 0


def test_thread_counters_add_up_every_thread_of_a_live_process() -> None:
    import os
    import threading

    import procfs  # benchmarks/procfs.py

    stop = threading.Event()
    waiting = threading.Thread(target=lambda: stop.wait(5.0))
    waiting.start()
    try:
        counters = procfs.thread_counters(os.getpid())
    finally:
        stop.set()
        waiting.join()
    assert counters is not None
    assert counters["threads"] >= 2
    assert counters["run_s"] >= counters["main_run_s"] > 0
    assert counters["voluntary"] >= counters["main_voluntary"]
    assert procfs.thread_counters(2**22 + 12345) is None  # no such process


def test_median_cell_takes_each_kind_of_process_s_median_over_passes() -> None:
    def cell(rps: float, worker_us: float) -> dict[str, Any]:
        return {"rows": 1, "concurrency": 32, "rps": rps, "p99_ms": 10.0, "max_ms": 20.0, "requests": int(rps),
                "per_role": {"worker": {"cpu_us_per_req": worker_us, "vol_per_1k": 1.0}}}

    merged = serving.median_cell([cell(100, 300), cell(120, 500), cell(110, 310)])
    assert merged["rps"] == 110
    assert merged["per_role"]["worker"] == {"cpu_us_per_req": 310, "vol_per_1k": 1.0}
    assert [p["per_role"]["worker"]["cpu_us_per_req"] for p in merged["passes"]] == [300, 500, 310]
