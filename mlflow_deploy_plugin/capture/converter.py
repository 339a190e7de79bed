"""The capture converter: a process that turns the spool's segments into Parquet files of the capture layout.

One converter serves a whole spool folder (``{spool}/{writer}/``: one sub-folder per writer,
see :mod:`.writer`), so a deployment pays for its Arrow imports once, not once per worker.
Compact records (float inputs, numeric predictions) become Arrow from their raw bytes, without
pandas (:mod:`.meta`): it is imported only for other records or a redaction. The local engine's supervisor starts it by module path (it imports none of this) while
the spool has work; a writer outside a supervisor (a Ray replica, a test) starts one for its own
process. Run as::

    python -m mlflow_deploy_plugin.capture.converter SPOOL [--parent PID] [--idle-exit S] [--drain]

It polls the spool every ``--poll`` seconds. Each writer folder holds its writer's settings
(``config.pickle``: capture root, deployment, redaction), a ``lock`` its writer holds while it
lives, segments being appended to (``.open``) and complete ones (``.seg``). For each complete
segment it writes the Parquet files, then a ``.done`` answer (JSON: requests written, rows,
requests lost and why) that the writer reads to count, then deletes the segment. A folder whose
lock is free belongs to a writer that died or closed: everything in it is converted, including
a segment a crash cut short (up to its torn record), and the folder is removed. Those go first.

It exits when told (SIGTERM or SIGINT, after one last pass), when its parent process dies
(``--parent``: one last pass, which also takes the folders of writers that died with it), after
``--idle-exit`` seconds with nothing to convert (whoever started it starts it again when a
segment waits), or after one pass with ``--drain`` (``delete`` converts what a stop left). Only
one converter works a spool at a time (a ``flock`` on the spool folder itself). It runs at a
lower CPU priority, so on a small machine serving comes first.

The Parquet files of a segment are named after it, so converting the same segment twice (after a
crash between writing and deleting it) replaces the files rather than duplicating rows.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlflow_deploy_plugin.capture.layout import join_path, partition_path, resolve_root
from mlflow_deploy_plugin.capture.meta import merge_tables
from mlflow_deploy_plugin.capture.spool import (
    CONFIG_NAME,
    DONE_SUFFIX,
    LOCK_NAME,
    OPEN_SUFFIX,
    SEGMENT_SUFFIX,
    read_records,
    records_to_tables,
    request_count,
)

_log = logging.getLogger(__name__)

_MAX_WRITE_ATTEMPTS = 2
POLL_S = 0.2


class Converter:
    """Converts segments to Parquet under ``root``; one per writer folder (its settings)."""

    def __init__(self, root: str, deployment: str, redact: Any = None, flush_interval_s: float = 2.0) -> None:
        self.root = root
        self.deployment = deployment
        self.redact = redact
        self.retry_pause_s = min(float(flush_interval_s), 1.0)
        self._fs: tuple[pafs.FileSystem, str] | None = None
        self._made_dirs: set[str] = set()

    def convert(self, path: str) -> dict[str, Any]:
        """Convert one segment file, answer in ``<segment>.done`` and delete the segment; returns
        what became of its requests."""
        name = os.path.basename(path)
        result: dict[str, Any] = {"segment": name, "requests": 0, "written": 0, "rows": 0,
                                  "convert_error": 0, "write_error": 0}
        try:
            with open(path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return result  # converted already (e.g. by the converter of a previous start)
        try:
            self._convert(path, data, result)
        except Exception as exc:  # never die on one segment: report it and go on
            _log.exception("Capture spool %s could not be converted", path)
            result["error"] = f"{type(exc).__name__}: {exc}"
        _answer(path, result)
        # Deleted even when it failed: counted as lost by the writer, it must not be written later.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return result

    def _convert(self, path: str, data: bytes, result: dict[str, Any]) -> None:
        records, torn = read_records(data)
        if torn:
            _log.warning("Capture spool %s: skipped %d bytes of a torn last record.", path, torn)
        result["requests"] = request_count(records)
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
                # Dictionary pages for all but floating-point columns: request ids, versions, roles,
                # categorical inputs and classes shrink; measured floats are nearly all distinct, and
                # Parquet's attempt to dictionary-encode them (then falling back) was ~3/4 of the
                # write's CPU (40k rows x 29 columns: 77 -> 20 ms, and a smaller file).
                options = {"compression": "zstd", "use_dictionary": [
                    field.name for field in table.schema if not pa.types.is_floating(field.type)]}
                if isinstance(fs, pafs.LocalFileSystem):
                    # Readers skip dot-files, so a half-written file is never seen; rename is atomic.
                    tmp = join_path(folder, f".{name}.tmp")
                    pq.write_table(table, tmp, filesystem=fs, **options)
                    fs.move(tmp, final_path)
                else:
                    # Object stores publish an object only once its upload completes.
                    pq.write_table(table, final_path, filesystem=fs, **options)
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


def _answer(segment: str, result: dict[str, Any]) -> None:
    """``<segment>.done``, written whole (tmp + rename): the writer counts from it."""
    base = segment.rsplit(".", 1)[0]
    tmp = f"{base}.done-tmp"
    try:
        with open(tmp, "w") as file:
            file.write(json.dumps(result))
        os.replace(tmp, base + DONE_SUFFIX)
    except OSError as exc:  # the folder went (its writer closed): nobody is left to count
        _log.debug("Could not answer for %s: %s", segment, exc)


def _load_config(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / CONFIG_NAME, "rb") as file:
            config: dict[str, Any] = pickle.load(file)
        return config
    except FileNotFoundError:
        return None


class SpoolConverter:
    """Works one spool folder: the segments of every writer folder in it."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self._converters: dict[str, Converter] = {}
        self._spool_fd: int | None = None

    def _take_spool(self, wait: bool) -> bool:
        """The spool's converter lock (a ``flock`` on the folder itself: no file to leave behind)."""
        if self._spool_fd is None:
            try:
                self._spool_fd = os.open(self.spool, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                return False
        try:
            fcntl.flock(self._spool_fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            return False
        return True

    def _release_spool(self) -> None:
        if self._spool_fd is not None:
            os.close(self._spool_fd)  # closing drops the flock
            self._spool_fd = None

    def sweep(self, wait: bool = False) -> int:
        """One pass over the spool: the folders of dead writers, then complete segments of live
        ones. Returns how many segments were converted (0 when another converter holds the spool)."""
        if not self._take_spool(wait):
            return 0
        try:
            dead, live = [], []
            try:
                folders = sorted(p for p in self.spool.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                return 0
            for folder in folders:
                fd = _writer_lock_if_free(folder)
                if fd is None:
                    live.append(folder)
                else:
                    dead.append((folder, fd))
            done = 0
            for folder, fd in dead:
                try:
                    done += self._drain(folder)
                finally:
                    if fd >= 0:
                        os.close(fd)
            for folder in live:
                for segment in sorted(folder.glob(f"*{SEGMENT_SUFFIX}")):
                    converter = self._converter(folder)
                    if converter is None:
                        break
                    converter.convert(str(segment))
                    done += 1
            return done
        finally:
            self._release_spool()

    def _converter(self, folder: Path) -> Converter | None:
        converter = self._converters.get(folder.name)
        if converter is None:
            config = _load_config(folder)
            if config is None:
                # Made by a version of the writer that did not store its settings: set aside under a
                # dot-name (which every reader skips), never deleted, so its rows are not lost.
                aside = folder.with_name(f".unconverted-{folder.name}")
                _log.warning("Capture spool %s has no %s: its segments cannot be converted here; kept as %s.",
                             folder, CONFIG_NAME, aside)
                with contextlib.suppress(OSError):
                    folder.rename(aside)
                return None
            converter = self._converters[folder.name] = Converter(**config)
        return converter

    def _drain(self, folder: Path) -> int:
        """Convert every segment of a dead writer's folder (complete ones, then one cut short), and
        remove the folder."""
        segments = sorted(folder.glob(f"*{SEGMENT_SUFFIX}")) + sorted(folder.glob(f"*{OPEN_SUFFIX}"))
        converter = self._converter(folder) if segments else None
        if segments and converter is None:
            return 0  # kept as it is: rows are never deleted unconverted
        written = 0
        assert converter is not None or not segments
        for segment in segments:
            assert converter is not None
            written += converter.convert(str(segment))["written"]
        if segments:
            _log.warning("Capture for deployment %r: converted %d requests left in the spool by a stopped "
                         "writer (%s).", converter.deployment if converter else "?", written, folder.name)
        shutil.rmtree(folder, ignore_errors=True)
        self._converters.pop(folder.name, None)
        return len(segments)


def _writer_lock_if_free(folder: Path) -> int | None:
    """The folder's writer lock, taken, if its writer is gone (-1: there is no lock file, so no
    writer: the lock is made before the folder gets its name); None while the writer lives."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        return -1
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _release_memory() -> None:
    """Give back what a burst's tables took: Arrow's allocator and the C heap keep freed memory for
    reuse (3,000 requests of 100 rows left 150 MiB resident; 110 once Arrow's is given back, 80 once
    the heap is trimmed too; 62 after start), so a converter waiting for the next burst stays small."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL(None).malloc_trim(0)


def run(spool: Path, *, parent: int | None = None, idle_exit_s: float | None = None, drain: bool = False,
        poll_s: float = POLL_S) -> int:
    """The converter's loop (see the module docstring)."""
    converter = SpoolConverter(spool)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Started with SIGTERM blocked (by its starter), so one sent during the imports waited for
    # the handler: it is delivered now, and the last pass still happens.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    if drain:
        converter.sweep(wait=True)
        return 0
    last_work = time.monotonic()
    worked = False
    while True:
        orphaned = parent is not None and os.getppid() != parent
        if stopping or orphaned:
            converter.sweep(wait=True)  # the last pass: what its writers left
            return 0
        if converter.sweep():
            last_work = time.monotonic()
            worked = True
        else:
            if worked:
                # A burst is over: give back what its tables took (Arrow's allocator keeps freed
                # memory for reuse), so a converter waiting for the next one stays small.
                _release_memory()
                worked = False
            if idle_exit_s is not None and time.monotonic() - last_work > idle_exit_s:
                return 0
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the converter process (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m mlflow_deploy_plugin.capture.converter")
    parser.add_argument("spool", type=Path)
    parser.add_argument("--parent", type=int, default=None, help="exit (after a last pass) when this pid dies")
    parser.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    parser.add_argument("--drain", action="store_true", help="one pass over everything, then exit")
    parser.add_argument("--poll", type=float, default=POLL_S, help="seconds between passes")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with contextlib.suppress(OSError):
        os.nice(10)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s capture-converter: %(message)s")
    return run(args.spool, parent=args.parent, idle_exit_s=args.idle_exit, drain=args.drain, poll_s=args.poll)


if __name__ == "__main__":
    sys.exit(main())
