"""The cold-start timeline (``timeline.py``): off by default, one line per mark from every process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_deploy_plugin import timeline


def test_marks_go_nowhere_unless_the_variable_names_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(timeline.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    timeline.mark("cli: create entered")
    timeline.mark_process_start("cli")
    assert list(tmp_path.iterdir()) == []


def test_every_process_appends_its_marks_to_the_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "timeline.txt"
    monkeypatch.setenv(timeline.ENV, str(path))
    timeline.mark("cli: create entered")
    code = ("from mlflow_deploy_plugin import timeline\n"
            "timeline.mark_process_start('worker')\n"
            "timeline.mark('worker: serving, said ready')\n")
    child = subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    timeline.mark("cli: create returns to MLflow's CLI")
    marks = [line.split(" ", 2) for line in path.read_text().splitlines()]
    steps = [step for _, _, step in marks]
    assert steps == ["cli: create entered", "worker process started", "worker: serving, said ready",
                     "cli: create returns to MLflow's CLI"]
    pids = [int(pid) for _, pid, _ in marks]
    assert pids[0] == pids[3] != pids[1] == pids[2], pids
    assert child.returncode == 0
    times = [float(at) for at, _, _ in marks]
    # The child's exec (10 ms clock ticks) lies between the marks made before and after it ran.
    assert times[0] - 0.02 <= times[1] <= times[2] <= times[3], times
