"""Property-based fuzzing of a real deployment's /invocations (hypothesis, a bounded number of examples).

Random JSON shapes (scoring-protocol envelopes around random values: huge integers, NaN, deep
nesting, long strings, wrong types), CSV, Parquet, raw bytes and random headers go to the session's
shared deployment over real HTTP. Whatever comes in:

- no answer is a 5xx, every error is short JSON in MLflow's shape;
- the deployment never goes down: /health answers and its worker processes are the same ones;
- the worker's memory stays bounded (RSS measured before and after);
- rows captured before the run are still there, intact, and the capture folder stays readable.
"""

from __future__ import annotations

import io
import json
import math
import uuid
from pathlib import Path

import pandas as pd
import pytest
import requests
from conftest import Env, Registry, split_payload, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_deploy_plugin.capture import read_capture

EXAMPLES = 150
# Parsing a body of up to max_body_mb=1 may leave allocator slack behind; a leak of what it decodes
# to, or a queue growing without bound, would be far larger.
RSS_GROWTH_LIMIT_MB = 150
FORMAT_KEYS = ["dataframe_split", "dataframe_records", "instances", "inputs", "params", "columns", "data"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/csv", "text/csv; charset=utf-8",
                 "application/vnd.apache.parquet", "application/json; charset=latin-1", "text/plain",
                 "application/json; format=pandas-split", "APPLICATION/JSON", ""]

# Printable ASCII without leading blanks: what an HTTP client lets through at all.
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300).map(str.lstrip)
numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -0.0, 1e308, 1.8e308, 5e-324, 2**63, -(2**63) - 1]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=50), st.just("x" * 20_000))
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=6), st.dictionaries(st.text(max_size=12), children, max_size=6)), max_leaves=40)


@st.composite
def json_bodies(draw: st.DrawFn, columns: list[str], real_rows: list[list[float]]) -> bytes:
    kind = draw(st.sampled_from(["real", "envelope", "table", "nested", "any"]))
    if kind == "real":  # real rows, one cell sometimes replaced: these reach the model
        rows = [list(row) for row in draw(st.lists(st.sampled_from(real_rows), min_size=1, max_size=5))]
        if draw(st.booleans()):
            rows[0][draw(st.integers(0, len(columns) - 1))] = draw(st.one_of(numbers, scalars))
        value: object = {"dataframe_split": {"columns": columns, "data": rows}}
    elif kind == "table":  # the real columns (some dropped or renamed), cells of any kind
        names = draw(st.lists(st.sampled_from([*columns, "extra", ""]), min_size=0, max_size=len(columns) + 2))
        rows = draw(st.lists(st.lists(st.one_of(numbers, scalars), min_size=len(names), max_size=len(names)),
                             max_size=5))
        key = draw(st.sampled_from(["dataframe_split", "dataframe_records"]))
        payload = ({"columns": names, "data": rows} if key == "dataframe_split"
                   else [dict(zip(names, row, strict=True)) for row in rows])
        value = {key: payload}
    elif kind == "nested":  # deep nesting under a protocol key
        depth = draw(st.integers(min_value=1, max_value=200_000))
        key = draw(st.sampled_from(FORMAT_KEYS))
        return ('{"%s": ' % key + "[" * depth + "]" * depth + "}").encode()  # noqa: UP031
    elif kind == "envelope":
        value = draw(st.dictionaries(st.sampled_from(FORMAT_KEYS), json_values, min_size=1, max_size=3))
    else:
        value = draw(json_values)
    text = json.dumps(value, allow_nan=True)
    if draw(st.booleans()):  # truncate or corrupt it sometimes
        cut = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:cut] + draw(st.text(max_size=5))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def csv_bodies(draw: st.DrawFn, columns: list[str]) -> bytes:
    header = ",".join(draw(st.lists(st.sampled_from([*columns, "x", '"q,uoted"']), max_size=len(columns) + 2)))
    cells = st.one_of(st.floats(allow_nan=True).map(repr), st.integers().map(str), st.text(max_size=8),
                      st.just("9" * 400), st.just('"'))
    lines = draw(st.lists(st.lists(cells, max_size=len(columns) + 2).map(",".join), max_size=6))
    return "\n".join([header, *lines]).encode("utf-8", "surrogatepass")


@st.composite
def parquet_bodies(draw: st.DrawFn, columns: list[str]) -> bytes:
    chosen = draw(st.one_of(st.just(columns), st.lists(st.sampled_from(columns), unique=True, max_size=len(columns))))
    rows = draw(st.integers(min_value=0, max_value=50))
    values = st.one_of(st.floats(min_value=0, max_value=100), st.floats(allow_nan=True))
    frame = pd.DataFrame({name: [draw(values) for _ in range(rows)] for name in chosen})
    if draw(st.booleans()):
        frame["text"] = [draw(st.text(max_size=10)) for _ in range(rows)]
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    data = buffer.getvalue()
    if draw(st.booleans()):  # damage it
        at = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        data = data[:at] + draw(st.binary(max_size=16)) + data[at + 16:]
    return data


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def fuzz_target(env: Env, shared_deployment: dict, registry: Registry) -> dict:
    """The shared deployment with a marked request captured on disk before any fuzzing."""
    url, name = shared_deployment["url"], shared_deployment["name"]
    marker = f"fuzz-before-{uuid.uuid4().hex}"
    rows = registry.features.iloc[:7]
    response = requests.post(f"{url}/invocations", json=split_payload(rows), headers={"X-Request-Id": marker},
                             timeout=30)
    assert response.status_code == 200, response.text[:300]
    capture = env.home / "deployments" / name / "capture"

    def marked() -> pd.DataFrame:
        frame = read_capture(str(capture))
        return frame[frame["_request_id"] == marker]

    wait_for(lambda: len(marked()) == len(rows), 30, "the marked request on disk")
    before = marked()
    return {"url": url, "name": name, "capture": capture, "marked": marked, "before": before.reset_index(drop=True),
            "columns": list(registry.features.columns), "workers": env.status(name)["worker_pids"],
            "rows": registry.features.iloc[:50].to_numpy().tolist()}


def test_no_input_makes_the_deployment_fail(env: Env, fuzz_target: dict) -> None:
    url, columns = fuzz_target["url"], fuzz_target["columns"]
    # Warm up every parser first (first use imports code: tens of MB that are not a leak).
    rows = pd.DataFrame(fuzz_target["rows"][:3], columns=columns)
    buffer = io.BytesIO()
    rows.to_parquet(buffer, index=False)
    for content_type, body in (("text/csv", rows.to_csv(index=False).encode()), ("application/vnd.apache.parquet",
                               buffer.getvalue()), ("application/json", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
                               ("application/json", b'{"inputs": [[1, "a", null]]}')):
        assert requests.post(f"{url}/invocations", data=body, headers={"Content-Type": content_type},
                             timeout=30).status_code < 500
    rss_before = {pid: _rss_mb(pid) for pid in fuzz_target["workers"]}
    session = requests.Session()
    seen: dict[int, int] = {}

    # Mostly a body with its own content type (so many reach the model), sometimes any header at all.
    bodies = st.one_of(json_bodies(columns, fuzz_target["rows"]).map(lambda b: ("application/json", b)),
                       csv_bodies(columns).map(lambda b: ("text/csv", b)),
                       parquet_bodies(columns).map(lambda b: ("application/vnd.apache.parquet", b)),
                       st.binary(max_size=2000).map(lambda b: ("application/octet-stream", b)))
    other_type = st.one_of(st.none(), st.none(), st.none(), st.sampled_from(CONTENT_TYPES), header_text)
    headers = st.fixed_dictionaries({}, optional={"X-Request-Id": header_text, "X-Model-Version": st.one_of(st.just("1"), header_text),
                                                  "Content-Encoding": st.sampled_from(["gzip", "identity", "br"]),
                                                  "Accept": header_text})

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(typed_body=bodies, content_type=other_type, sent_headers=headers)
    def one_request(typed_body: tuple[str, bytes], content_type: str | None, sent_headers: dict[str, str]) -> None:
        body = typed_body[1]
        sent_headers = {**sent_headers, "Content-Type": typed_body[0] if content_type is None else content_type}
        response = session.post(f"{url}/invocations", data=body, headers=sent_headers, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text[:500], body[:300], sent_headers)
        if response.status_code != 200:
            assert len(response.content) < 2048, (response.status_code, len(response.content))
            error = response.json()
            assert set(error) - {"sqlstate", "error_class"} == {"error_code", "message"} and "Traceback" not in error["message"], error

    one_request()
    assert sum(seen.values()) >= EXAMPLES and seen.get(200, 0) and len(seen) > 2, seen  # it did reach the model

    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert env.status(fuzz_target["name"])["worker_pids"] == fuzz_target["workers"], "no worker died"
    growth = {pid: _rss_mb(pid) - before for pid, before in rss_before.items()}
    assert all(grown < RSS_GROWTH_LIMIT_MB for grown in growth.values()), growth
    print(f"fuzz: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}, "
          f"worker RSS growth MB {({pid: round(g, 1) for pid, g in growth.items()})}")

    before = fuzz_target["before"]
    after = fuzz_target["marked"]().reset_index(drop=True)
    # Columns fuzzed requests brought in later files are empty on these rows; the rest is unchanged.
    assert after.drop(columns=before.columns).isna().all().all()
    pd.testing.assert_frame_equal(after[before.columns], before, check_dtype=False)  # files unify types on read
    assert math.isfinite(len(read_capture(str(fuzz_target["capture"]))))  # every file still readable
