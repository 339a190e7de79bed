"""Hostile input, overload and privacy on real deployments: real CLI, real worker processes, real HTTP.

- decode bombs get a 413 and the worker that refused them is the same process afterwards;
- a full queue answers 503 with Retry-After at once, and the service recovers by itself;
- a deployment with TLS and capture_exclude/capture_hash serves HTTPS and never writes the
  excluded column; everything under a deployment's folder is private (0700 / 0600).
"""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import json
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import REPO, Env, Registry, post_json, split_payload, wait_for

from mlflow_deploy_plugin.capture import read_capture

JSON = "application/json"
PARQUET = "application/vnd.apache.parquet"


def _metric(url: str, name: str, **kwargs: object) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", timeout=10, **kwargs).text  # type: ignore[arg-type]
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
    return sum(values) if values else None


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _assert_short_json_error(response: requests.Response, status: int, mentions: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert len(response.content) < 2048 and "Traceback" not in response.text
    body = response.json()
    assert set(body) - {"sqlstate", "error_class"} == {"error_code", "message"} and mentions in body["message"], body


# -- decode bombs -----------------------------------------------------------------------------


def test_decode_bombs_get_413_and_the_worker_survives(env: Env, shared_deployment: dict, registry: Registry) -> None:
    url, name = shared_deployment["url"], shared_deployment["name"]
    workers = env.status(name)["worker_pids"]
    columns = list(registry.features.columns)
    parquet_bomb = _parquet(pd.DataFrame({c: np.zeros(1_000_000) for c in columns}))
    assert len(parquet_bomb) < 1024 * 1024 // 4, len(parquet_bomb)  # 30M cells in a quarter of max_body_mb=1
    bombs = {
        "parquet": (PARQUET, parquet_bomb, "max_rows=100000"),
        "json_rows": (JSON, '{"inputs": [' + ",".join(["[0]"] * 150_000) + "]}", "max_rows=100000"),
        "csv_rows": ("text/csv", ",".join(columns) + "\n" + "0\n" * 400_000, "max_rows=100000"),
    }
    for case, (content_type, body, mentions) in bombs.items():
        for _ in range(3):  # a handful, as the crash report had
            response = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": content_type},
                                     timeout=60)
            _assert_short_json_error(response, 413, mentions)
        assert requests.get(f"{url}/health", timeout=10).status_code == 200, case
    # An integer literal above 1e308 used to be a 500 carrying the exception text.
    row = "9" * 400 + ", 1" * (len(columns) - 1)
    huge = json.dumps({"dataframe_split": {"columns": columns, "data": [["ROW"]]}}).replace('"ROW"', row)
    _assert_short_json_error(post_json(url, huge), 400, repr(columns[0]))
    assert env.status(name)["worker_pids"] == workers, "the workers that refused the bombs are still serving"
    assert post_json(url, split_payload(registry.features.iloc[:3])).status_code == 200


# -- load shedding ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated_model(env: Env, registry: Registry) -> str:
    """A registered pyfunc model whose predict waits for a file (tests/assets/gated_model.py)."""
    name = f"gated_{registry.model.rsplit('_', 1)[-1]}"
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=str(REPO / "tests/assets/gated_model.py"),
                                input_example=pd.DataFrame({"gate": [""], "x": [1.0]}), registered_model_name=name,
                                pip_requirements=["pandas"])
    return name


@pytest.fixture
def gated(env: Env, gated_model: str) -> Iterator[dict]:
    name = "gated"
    env.create(name, f"models:/{gated_model}/1", "max_queue=2", "warm_standby=false", "timeout_s=60")
    try:
        yield {"name": name, **env.status(name)}
    finally:
        env.delete(name)


def _ask(url: str, gate: str, x: float) -> requests.Response:
    return post_json(url, {"dataframe_split": {"columns": ["gate", "x"], "data": [[gate, x]]}}, timeout=90)


def test_a_full_queue_sheds_with_503_and_recovers_by_itself(env: Env, gated: dict, tmp_path: Path) -> None:
    url = gated["url"]
    gate = tmp_path / "open"
    answers: dict[float, requests.Response] = {}

    def ask(x: float) -> None:
        answers[x] = _ask(url, str(gate), x)

    busy = threading.Thread(target=ask, args=(1.0,))
    busy.start()
    wait_for(lambda: _metric(url, "mlflow_deploy_in_flight_requests") == 1, 30, "the first request to be predicting")
    waiting = [threading.Thread(target=ask, args=(x,)) for x in (2.0, 3.0)]
    for thread in waiting:
        thread.start()
    wait_for(lambda: _metric(url, "mlflow_deploy_queued_requests") == 2, 30, "two requests to be queued")
    try:
        shed = [_ask(url, "", 9.0) for _ in range(20)]  # answered while the model is still held
    finally:
        gate.touch()
        for thread in (busy, *waiting):
            thread.join(90)
    for response in shed:
        _assert_short_json_error(response, 503, "max_queue=2")
        assert response.headers["Retry-After"] == "1"
    assert {x: r.json() for x, r in answers.items()} == {x: {"predictions": [2 * x]} for x in (1.0, 2.0, 3.0)}
    # Recovered without anyone touching it: the queue is empty and requests are answered again.
    assert _metric(url, "mlflow_deploy_queued_requests") == 0
    assert _ask(url, "", 4.0).json() == {"predictions": [8.0]}
    assert env.status(gated["name"])["worker_pids"] == gated["worker_pids"]


# -- TLS, capture privacy, file modes ---------------------------------------------------------


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_and_capture_privacy_on_a_real_deployment(env: Env, registry: Registry, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    name = "private"
    columns = list(registry.features.columns)
    excluded, hashed = columns[0], columns[1]
    env.create(name, f"models:/{registry.model}/1", f"tls_cert={cert}", f"tls_key={key}", "warm_standby=false",
               f"capture_exclude={excluded}", f"capture_hash={hashed}")
    try:
        url = env.status(name)["url"]
        assert url.startswith("https://127.0.0.1:"), url
        rows = registry.features.iloc[:20]
        response = requests.post(f"{url}/invocations", json=split_payload(rows), verify=str(cert), timeout=30)
        assert response.status_code == 200, response.text[:300]
        with pytest.raises(requests.exceptions.ConnectionError):  # nothing is served in clear
            requests.get(url.replace("https://", "http://") + "/health", timeout=10)
        # `predict` trusts the deployment's own certificate (in process: the verb as a process is test_cli_verbs').
        predicted = env.cli_here("predict", "-t", "lifecycle", "--name", name, "-I", str(_input_file(tmp_path, rows)))
        assert "predictions" in predicted.stdout or predicted.stdout.strip().startswith("["), predicted.stdout[:300]

        root = env.home / "deployments" / name
        wait_for(lambda: list((root / "capture").glob("date=*/*.parquet")), 30, "captured rows on disk")
        captured = read_capture(str(root / "capture"))
        assert excluded not in captured.columns
        assert set(captured[hashed].str.len()) == {16}
        assert captured[hashed].nunique() == rows[hashed].nunique(), "equal values hash equal"
        for path in (root / "capture").rglob("*.parquet"):
            assert str(rows[excluded].iloc[0]).encode() not in path.read_bytes()
        assert stat.S_IMODE((root / "capture.key").stat().st_mode) == 0o600

        loose = [f"{oct(stat.S_IMODE(p.lstat().st_mode))} {p.relative_to(root)}" for p in [root, *root.rglob("*")]
                 if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o077]
        assert not loose, "readable by others:\n" + "\n".join(loose)
    finally:
        env.delete(name)


def _input_file(folder: Path, rows: pd.DataFrame) -> Path:
    path = folder / "input.json"
    rows.to_json(path, orient="records")
    return path


def test_a_name_with_a_trailing_newline_is_refused(env: Env, registry: Registry) -> None:
    proc = env.cli_here("create", "-t", "lifecycle", "--name", "churn\n", "-m", f"models:/{registry.model}/1",
                        check=False)  # through MLflow's click group in process, as the argument a shell passes
    assert proc.returncode != 0
    assert "Invalid deployment name 'churn\\n'" in proc.stderr, proc.stderr[-500:]
    assert not (env.home / "deployments" / "churn\n").exists()
