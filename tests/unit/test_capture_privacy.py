"""Captured data stays bounded and private: the buffer in bytes, excluded and hashed columns, folder
and file modes, deployment names. Real writers on temp folders, real files.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_deploy_plugin.capture import CapturedRequest, CaptureWriter, read_capture
from mlflow_deploy_plugin.capture.redaction import CaptureRedaction, keyed_hash
from mlflow_deploy_plugin.capture.spool import encode_record
from mlflow_deploy_plugin.config import parse_config
from mlflow_deploy_plugin.errors import InvalidRequest
from mlflow_deploy_plugin.spec import DeploymentSpec, ModelRef
from mlflow_deploy_plugin.state import (
    StateStore,
    append_history_file,
    file_lock,
    make_private_dirs,
    read_or_create_secret,
    validate_name,
)


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.02)
    raise AssertionError(f"Timed out after {timeout_s}s waiting for {what}")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def answered(rid: str, frame: pd.DataFrame) -> CapturedRequest:
    return CapturedRequest(rid, 1.7e9, "1", 200, 1.0, frame, np.zeros(len(frame)))


def test_the_capture_buffer_is_bounded_in_bytes_and_drops_are_counted(tmp_path: Path) -> None:
    """What waits to be written (spooled records) is bounded in bytes; the converter is stopped
    (SIGSTOP) meanwhile, so nothing leaves the buffer."""
    drops: list[tuple[int, str]] = []
    # 100 requests of 10 rows x 4 float64 + 10 float64 predictions, spooled as about this many bytes each:
    size = len(encode_record(answered("r00", pd.DataFrame(np.zeros((10, 4))))))
    writer = CaptureWriter(str(tmp_path / "capture"), "dep", max_buffer_bytes=40 * size, flush_rows=1,
                           flush_interval_s=0.05, on_drop=lambda n, reason: drops.append((n, reason)))
    pid = None
    try:
        assert writer.record(answered("first", pd.DataFrame(np.zeros((1, 4)))))
        wait_until(lambda: writer.written_requests == 1, 30, "the first request to be written")
        pid = writer.converter_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        accepted = sum(writer.record(answered(f"r{i:02d}", pd.DataFrame(np.zeros((10, 4))))) for i in range(100))
        assert writer.buffered_bytes <= writer.max_buffer_bytes
        assert accepted == 40, accepted
        assert drops == [(1, "buffer_full")] * (100 - accepted)
        one_too_big = answered("huge", pd.DataFrame(np.zeros((2000, 4))))
        assert not writer.record(one_too_big), "a request larger than the whole buffer is dropped"
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        writer.close(timeout_s=30)
    assert writer.written_requests == accepted + 1
    assert writer.dropped_requests == 100 - accepted + 1


def test_excluded_columns_never_reach_disk_and_hashed_ones_are_keyed(tmp_path: Path) -> None:
    key = read_or_create_secret(tmp_path / "capture.key")
    redaction = CaptureRedaction(exclude=["ssn"], hashed=["city", "age"], key=key)
    root = tmp_path / "capture"
    frame = pd.DataFrame({"ssn": ["123-45-6789", "987-65-4321"], "city": ["Lyon", None], "age": [41.0, 41.0],
                          "x": [1.5, 2.5]})
    with CaptureWriter(str(root), "dep", redact=redaction.apply) as writer:
        assert writer.record(answered("r1", frame))
    for path in root.rglob("*.parquet"):
        assert b"123-45-6789" not in path.read_bytes() and b"Lyon" not in path.read_bytes()
    captured = read_capture(str(root))
    assert "ssn" not in captured.columns
    assert captured["x"].tolist() == [1.5, 2.5]
    city = captured["city"].tolist()
    assert city[1] is None or pd.isna(city[1]), "missing stays missing"
    assert len(city[0]) == 16 and city[0] == keyed_hash(pd.Series(["Lyon"]), key.encode())[0]
    assert captured["age"].nunique() == 1, "equal values hash equal: distributions survive"
    other = keyed_hash(pd.Series(["Lyon"]), b"another key")[0]
    assert other != city[0], "the hash depends on the deployment's secret"


def test_the_reference_is_redacted_like_captured_inputs(tmp_path: Path) -> None:
    key = read_or_create_secret(tmp_path / "capture.key")
    redaction = CaptureRedaction(exclude=["ssn"], hashed=["city"], key=key)
    reference = pd.DataFrame({"ssn": ["1"], "city": ["Lyon"], "_input": ["{'raw': 1}"]})
    out = redaction.apply(reference)
    assert list(out.columns) == ["city"], "unstructured text is dropped too: it could hold anything"
    assert out["city"][0] == keyed_hash(pd.Series(["Lyon"]), key.encode())[0]


def test_the_capture_key_is_private_stable_and_agreed_on_by_racing_processes(tmp_path: Path) -> None:
    path = tmp_path / "dep" / "capture.key"
    keys: list[str] = []
    threads = [threading.Thread(target=lambda: keys.append(read_or_create_secret(path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(set(keys)) == 1 and len(keys[0]) >= 32, keys
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert read_or_create_secret(path) == keys[0]
    assert not [p for p in path.parent.iterdir() if p.name != "capture.key"], "no temp file left behind"


def test_state_files_and_folders_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = StateStore(tmp_path / "home")
        spec = DeploymentSpec("dep", ModelRef("models:/m/1", "m", "1"))
        store.write_spec(spec)
        store.append_history("dep", "created")
        paths = store.paths("dep")
        with file_lock(paths.lock):
            pass
        for folder in (store.home, store.deployments_dir, paths.root):
            assert mode(folder) == 0o700, folder
        for file in (paths.spec, paths.history, paths.lock):
            assert mode(file) == 0o600, file
        os.chmod(paths.root, 0o755)  # made by an older version
        store.write_spec(spec)
        assert mode(paths.root) == 0o700
        archived = store.archive("dep")
        assert mode(archived.parent) == 0o700
        append_history_file(archived / "history.jsonl", "deleted")
        assert mode(archived / "history.jsonl") == 0o600
        make_private_dirs(tmp_path / "a" / "b")
        assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700
    finally:
        os.umask(old)


@pytest.mark.parametrize("name", ["churn\n", "churn\nx", "\nchurn", "-churn", "a" * 64, "a/b", ""])
def test_deployment_names_must_match_in_full(name: str) -> None:
    with pytest.raises(ValueError, match="Invalid deployment name"):
        validate_name(name)


def test_capture_and_tls_options_are_validated(tmp_path: Path) -> None:
    for raw, words in (({"capture_exclude": "a", "capture_hash": "b,a"}, "both capture_exclude and capture_hash"),
                       ({"capture_hash": ","}, "capture_hash"),
                       ({"capture_buffer_mb": "0"}, "capture_buffer_mb"),
                       ({"tls_cert": str(tmp_path / "missing.pem")}, "tls_cert"),
                       ({"max_queue": "0"}, "max_queue"),
                       ({"max_rows": "many"}, "max_rows"),
                       ({"max_cells": "-1"}, "max_cells"),
                       ({"batching": "sometimes"}, "batching")):
        with pytest.raises(InvalidRequest, match=words):
            parse_config(raw)
    config = parse_config({"capture_exclude": " ssn , email", "capture_hash": "city", "batching": "on"})
    assert config.capture_exclude_columns == ("ssn", "email") and config.capture_hash_columns == ("city",)
    assert config.batching == "true"
