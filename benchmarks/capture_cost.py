"""What capturing one request costs in CPU: on the request path, in the writer thread, in the converter.

Robust to a busy machine: it counts CPU time (``time.process_time``) of tight in-process loops
over the real functions, not wall-clock throughput. For 1-row and 100-row requests with JSON
(``dataframe_split``, the parser's fast path) and Parquet bodies (MLflow's parser), each parsed by
the real :func:`parse_request` and predicted by a real LogisticRegression on 20 features:

- ``encode``: :func:`capture.spool.encode_record`, a record per request (what the request path
  paid before batch records, and still pays for requests the batch form does not take);
- ``batch``: :func:`capture.spool.encode_items`, the writer thread's batch records of
  ``WRITE_BATCH`` requests at a time (what a write takes at ~1,000 req/s), as the buffers it
  writes (not joined); a record each for requests the batch form does not take;
- ``record``: :meth:`CaptureWriter.record` plus the writer thread appending to the spool (all the
  serving process pays);
- ``convert``: the converter process's work per request (:class:`capture.converter.Converter` on
  segments as the writer makes them: ``--flush-rows`` input rows each, the writer's default, or all
  the requests when fewer: decode, Arrow, Parquet with zstd, the answer file);
- ``sweep``: what the converter's poll of a spool with nothing complete costs (two live writers),
  per pass (it passes every ``converter.POLL_S``).

    .venv/bin/python benchmarks/capture_cost.py [--requests 4000] [--repeat 3] [--flush-rows N]

Run it with PYTHONPATH pointing at two checkouts to compare them (figures are minima over repeats;
a checkout without batch records shows ``-`` for ``batch`` and converts records made one by one).
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from mlflow_deploy_plugin.capture import CaptureWriter
from mlflow_deploy_plugin.capture.converter import POLL_S, Converter, SpoolConverter
from mlflow_deploy_plugin.capture.spool import encode_record

try:
    from mlflow_deploy_plugin.capture.batch import batch_item
    from mlflow_deploy_plugin.capture.spool import encode_items, encode_records
except ImportError:  # a checkout from before batch records, measured for comparison
    encode_records = None
from mlflow_deploy_plugin.serving.app import Answer
from mlflow_deploy_plugin.serving.protocol import parse_request

COLUMNS = [f"f{i}" for i in range(20)]
VARIANTS = 64  # distinct bodies per shape, cycled
WRITE_BATCH = 250  # requests one write of the writer thread takes: 0.25 s at 1,000 req/s


def answers(kind: str, rows: int, model: Any, frame: pd.DataFrame) -> list[Any]:
    """Answers as the app hands them to capture: the parsed frame and the model's predictions."""
    out = []
    for i in range(VARIANTS):
        part = frame.iloc[(i * rows) % (len(frame) - rows):][:rows]
        if kind == "json":
            body = json.dumps({"dataframe_split": {"columns": COLUMNS, "data": part.to_numpy().tolist()}}).encode()
            content_type = "application/json"
        else:
            buffer = io.BytesIO()
            part.reset_index(drop=True).to_parquet(buffer)
            body, content_type = buffer.getvalue(), "application/vnd.apache.parquet"
        parsed = parse_request(body, content_type, None, None, frozenset(COLUMNS))
        # raw_inputs: the JSON fast path's rows, as the app hands them over (None for Parquet bodies).
        out.append(Answer(f"{i:032x}", time.time(), "1", 200, 1.25, parsed.data, model.predict(parsed.data),
                          model_name="bench", raw_inputs=parsed.raw))
    return out


def cpu_us(fn: Any, n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn(n)
        best = min(best, time.process_time() - start)
    return best / n * 1e6


def measure(kind: str, rows: int, model: Any, frame: pd.DataFrame, n: int, repeat: int,
            flush_rows: int) -> dict[str, Any]:
    batch = answers(kind, rows, model, frame)

    def encode(count: int) -> None:
        for i in range(count):
            encode_record(batch[i % VARIANTS])

    def record(count: int) -> None:
        with tempfile.TemporaryDirectory(prefix="capture-cost-") as tmp:
            writer = CaptureWriter(str(Path(tmp) / "root"), "bench", flush_rows=1 << 40, flush_interval_s=3600,
                                   spool_dir=str(Path(tmp) / "spool"), converter="external")
            for i in range(count):
                writer.record(batch[i % VARIANTS])
            time.sleep(0.4)  # the writer thread appends what waits every 0.25 s: its CPU counts too
            writer.close(timeout_s=0.05)  # nobody converts (external): only what the serving process pays

    def spooled(count: int) -> bytes:
        """What the writer spools for ``count`` requests: batch records of WRITE_BATCH requests."""
        requests = [batch[i % VARIANTS] for i in range(count)]
        if encode_records is None:
            return b"".join(map(encode_record, requests))
        return b"".join(b"".join(encode_records(requests[i:i + WRITE_BATCH])[0])
                        for i in range(0, count, WRITE_BATCH))

    items = [taken[0] for answer in batch if (taken := batch_item(answer)) is not None] \
        if encode_records is not None else []

    def batched(count: int) -> None:  # as the writer thread does: buffers for os.writev, not joined
        for start in range(0, count, WRITE_BATCH):
            chunk = [items[i % len(items)] for i in range(start, min(count, start + WRITE_BATCH))] if items else []
            if chunk:
                encode_items(chunk)
            else:  # requests the batch form does not take (Parquet bodies): a record each
                for i in range(start, min(count, start + WRITE_BATCH)):
                    encode_record(batch[i % VARIANTS])

    per_segment = max(1, min(n, flush_rows // rows))
    segment = spooled(per_segment)

    def convert(count: int) -> None:  # segments of `per_segment` requests, `count` requests in all
        with tempfile.TemporaryDirectory(prefix="capture-cost-") as tmp:
            converter = Converter(str(Path(tmp) / "root"), "bench")
            for k in range(max(1, count // per_segment)):
                path = Path(tmp) / f"seg-bench-{k}.seg"
                path.write_bytes(segment)
                result = converter.convert(str(path))
                assert result["written"] == per_segment, result

    return {"body": kind, "rows": rows, "encode_us": cpu_us(encode, n, repeat),
            "batch_us": cpu_us(batched, n, repeat) if encode_records is not None else None,
            "record_us": cpu_us(record, n, repeat), "convert_us": cpu_us(convert, n, repeat),
            "segment_requests": per_segment, "spool_bytes": len(segment) // per_segment}


def sweep_us(passes: int, repeat: int) -> float:
    """CPU of one converter pass over a spool whose two live writers have nothing complete."""
    with tempfile.TemporaryDirectory(prefix="capture-cost-") as tmp:
        writers = [CaptureWriter(str(Path(tmp) / "root"), "bench", flush_interval_s=3600,
                                 spool_dir=str(Path(tmp) / "spool"), converter="external") for _ in range(2)]
        try:
            for writer in writers:
                writer._ensure_folder()  # what a writer that has spooled records has
            converter = SpoolConverter(Path(tmp) / "spool")
            return cpu_us(lambda count: [converter.sweep() for _ in range(count)], passes, repeat)
        finally:
            for writer in writers:
                writer.close(timeout_s=0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per measurement (default 4000)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats; the minimum is shown (default 3)")
    parser.add_argument("--flush-rows", type=int, default=None,
                        help="input rows per segment (default: CaptureWriter's flush_rows)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the closing writer's "not converted" warning is expected
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(5000, len(COLUMNS))), columns=COLUMNS)
    model = LogisticRegression(max_iter=500).fit(frame, (frame["f0"] + frame["f1"] > 0).astype(int))
    flush_rows = args.flush_rows or inspect.signature(CaptureWriter).parameters["flush_rows"].default
    results = [measure(kind, rows, model, frame, args.requests if rows == 1 else max(args.requests // 10, 100),
                       args.repeat, flush_rows) for rows in (1, 100) for kind in ("json", "parquet")]
    print(f"{'body':<8} {'rows':>4} {'encode us':>10} {'batch us':>9} {'record us':>10} {'convert us':>11} {'total us':>9} "
          f"{'seg req':>8} {'spool B':>8}   (CPU per request; segments of {flush_rows} rows at most)")
    for r in results:
        total = r["record_us"] + r["convert_us"]
        batch_us = "-" if r["batch_us"] is None else f"{r['batch_us']:.1f}"
        print(f"{r['body']:<8} {r['rows']:>4} {r['encode_us']:>10.1f} {batch_us:>9} {r['record_us']:>10.1f} "
              f"{r['convert_us']:>11.1f} {total:>9.1f} {r['segment_requests']:>8} {r['spool_bytes']:>8}")
    print("record = encode + the writer's bookkeeping + its thread's appends (the serving process); "
          "convert = the converter process.")
    print(f"converter pass over a spool with nothing complete: {sweep_us(200, args.repeat):.0f} us CPU "
          f"(one every {POLL_S:g} s while it runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
