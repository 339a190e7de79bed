"""The capture converter: a process that turns spool segments into Parquet files of the capture layout.

Started by :class:`.writer.CaptureWriter` (``python -m mlflow_deploy_plugin.capture.converter DIR``)
with its settings on stdin, then driven by lines ``convert <segment path>``; for each it answers
one JSON line on stdout (requests written, rows, requests lost and why) and deletes the segment.
It runs at a lower CPU priority, so on a small machine serving comes first.

When stdin closes (the writer closed, or its process died) it converts whatever segments are left
in the writer's folder, including one a crash cut short (up to its torn record), removes the folder
and exits. At start it also converts the folders of writers that died without a converter to
finish for them (their lock file is free).

The Parquet files of a segment are named after it, so converting the same segment twice (after a
crash between writing and deleting it) replaces the files rather than duplicating rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import IO, Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlflow_deploy_plugin.capture.arrow import merge_tables
from mlflow_deploy_plugin.capture.layout import join_path, partition_path, resolve_root
from mlflow_deploy_plugin.capture.spool import (
    CONFIG_HEAD,
    LOCK_NAME,
    OPEN_SUFFIX,
    SEGMENT_SUFFIX,
    read_records,
    records_to_tables,
)

_log = logging.getLogger(__name__)

_MAX_WRITE_ATTEMPTS = 2


def _read_config(stream: IO[bytes]) -> dict[str, Any]:
    head = stream.read(CONFIG_HEAD.size)
    if len(head) != CONFIG_HEAD.size:
        raise SystemExit("capture converter: no settings on stdin")
    (length,) = CONFIG_HEAD.unpack(head)
    return pickle.loads(stream.read(length))


class Converter:
    """Converts segments to Parquet under ``root``; one per spool folder."""

    def __init__(self, root: str, deployment: str, redact: Any = None, flush_interval_s: float = 2.0) -> None:
        self.root = root
        self.deployment = deployment
        self.redact = redact
        self.retry_pause_s = min(float(flush_interval_s), 1.0)
        self._fs: tuple[pafs.FileSystem, str] | None = None
        self._made_dirs: set[str] = set()

    def convert(self, path: str) -> dict[str, Any]:
        """Convert one segment file and delete it; returns what became of its requests."""
        result: dict[str, Any] = {"segment": os.path.basename(path), "requests": 0, "written": 0, "rows": 0,
                                  "convert_error": 0, "write_error": 0}
        try:
            with open(path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return result  # converted already (e.g. by the converter of a previous start)
        records, torn = read_records(data)
        if torn:
            _log.warning("Capture spool %s: skipped %d bytes of a torn last record.", path, torn)
        result["requests"] = len(records)
        by_day, unconverted = records_to_tables(records, self.deployment, self.redact)
        result["convert_error"] = unconverted
        if unconverted:
            _log.warning("Capture for deployment %r: %d requests could not be converted to Arrow and "
                         "were dropped.", self.deployment, unconverted)
        stem = os.path.basename(path).rsplit(".", 1)[0].removeprefix("seg-")
        k = 0
        for day, tables in sorted(by_day.items()):
            for table, n in merge_tables(tables):
                if self._write(f"part-{stem}-{k:03d}.parquet", day, table):
                    result["written"] += n
                    result["rows"] += table.num_rows
                else:
                    result["write_error"] += n
                k += 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return result

    def _write(self, name: str, day: Any, table: Any) -> bool:
        for attempt in range(_MAX_WRITE_ATTEMPTS):
            tmp = None
            fs = None
            try:
                if self._fs is None:
                    self._fs = resolve_root(self.root)
                fs, base = self._fs
                folder = partition_path(base, day)
                if folder not in self._made_dirs:
                    fs.create_dir(folder, recursive=True)
                    self._made_dirs.add(folder)
                final_path = join_path(folder, name)
                if isinstance(fs, pafs.LocalFileSystem):
                    # Readers skip dot-files, so a half-written file is never seen; rename is atomic.
                    tmp = join_path(folder, f".{name}.tmp")
                    pq.write_table(table, tmp, filesystem=fs, compression="zstd")
                    fs.move(tmp, final_path)
                else:
                    # Object stores publish an object only once its upload completes.
                    pq.write_table(table, final_path, filesystem=fs, compression="zstd")
                return True
            except Exception as exc:
                self._made_dirs.clear()
                if tmp is not None and fs is not None:
                    with contextlib.suppress(Exception):
                        fs.delete_file(tmp)
                if attempt + 1 < _MAX_WRITE_ATTEMPTS:
                    time.sleep(self.retry_pause_s)
                else:
                    _log.warning("Capture for deployment %r: writing to %s failed (%s: %s); %d rows dropped "
                                 "and counted.", self.deployment, self.root, type(exc).__name__, exc,
                                 table.num_rows)
        return False

    def drain_folder(self, folder: Path) -> list[dict[str, Any]]:
        """Convert every segment left in ``folder`` (complete ones, then one cut short) and remove it."""
        results = []
        segments = sorted(folder.glob(f"*{SEGMENT_SUFFIX}")) + sorted(folder.glob(f"*{OPEN_SUFFIX}"))
        for segment in segments:
            results.append(self.convert(str(segment)))
        shutil.rmtree(folder, ignore_errors=True)
        return results

    def adopt_orphans(self, own: Path) -> None:
        """Convert the folders next to ``own`` whose writer died (nobody holds their lock)."""
        for folder in sorted(own.parent.iterdir()):
            if folder == own or folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                fd = os.open(folder / LOCK_NAME, os.O_RDWR)
            except OSError:
                continue  # being created, or removed by whoever converted it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # its writer (or another converter) is alive
            try:
                results = self.drain_folder(folder)
                written = sum(r["written"] for r in results)
                if results:
                    _log.warning("Capture for deployment %r: converted %d requests left in the spool by a "
                                 "stopped worker (%s).", self.deployment, written, folder.name)
            finally:
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the converter process (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    own = Path(args[0])
    with contextlib.suppress(OSError):
        os.nice(10)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s capture-converter: %(message)s")
    stdin, stdout = sys.stdin.buffer, sys.stdout
    converter = Converter(**_read_config(stdin))
    with contextlib.suppress(Exception):
        converter.adopt_orphans(own)
    for line in stdin:
        command, _, path = line.decode().strip().partition(" ")
        if command != "convert":
            continue
        try:
            result = converter.convert(path)
        except Exception as exc:  # never die on one segment: report it and go on
            _log.exception("Capture spool %s could not be converted", path)
            result = {"segment": os.path.basename(path), "error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                os.unlink(path)  # counted as lost by the writer: must not be written later as well
        stdout.write(json.dumps(result) + "\n")
        stdout.flush()
    converter.drain_folder(own)  # the writer is gone: whatever it left
    return 0


if __name__ == "__main__":
    sys.exit(main())
