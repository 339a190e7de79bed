"""One capture converter per deployment, run by the supervisor while the spool has work.

Workers append captured requests to a spool (``capture/.spool/<writer>/``); a converter process
(``mlflow_deploy_plugin.capture.converter``, Arrow: ~60 MB resident, ~35 MiB PSS; more with
pandas, which it loads only for inputs other than float frames) turns its segments into Parquet.
One per worker cost a deployment that much per worker; this keeps one for the deployment,
started by module path (the supervisor imports none of pandas, Arrow or the capture package) when
a writer starts a segment (a head start: its imports are done before the segment is complete,
so a start delays no captured row) or died leaving its folder, and again if it dies. It exits by
itself after :data:`IDLE_EXIT_S` with nothing to do, so an idle deployment does not hold it
(~35 MiB PSS), and with its parent, so a successor supervisor starts its own. On a graceful stop, once the workers are gone (their
writers answered for what they accepted), it makes a last pass over everything left.

Standard library only (the supervisor imports it). The spool layout names below are those of
``capture/spool.py``; a unit test keeps them the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

_logger = logging.getLogger("mlflow_deploy_plugin.supervisor")

LOCK_NAME = "lock"
SEGMENT_SUFFIX = ".seg"
OPEN_SUFFIX = ".open"
CHECK_S = 0.5  # how often the spool is looked at while no converter runs
# A converter with nothing to convert for this long exits. Short: it is started again as soon as a
# writer opens a segment, which completes flush_interval_s (2 s) later at the earliest, while its
# start takes ~0.15 s of CPU; under steady traffic a segment completes every 2 s, so it stays.
IDLE_EXIT_S = 5.0
RESTART_PAUSE_S = 2.0  # a converter that died is started again at most this often
CONVERTER_MODULE = "mlflow_deploy_plugin.capture.converter"


def _writer_gone(folder: Path) -> bool:
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its writer lives
    finally:
        os.close(fd)
    return True


def _writer_folders(spool: Path) -> list[tuple[Path, list[str]]]:
    """Each writer's folder in ``spool`` with the names it holds (unreadable ones left out)."""
    try:
        folders = [entry for entry in os.scandir(spool) if entry.is_dir() and not entry.name.startswith(".")]
    except OSError:
        return []
    found = []
    for entry in folders:
        try:
            found.append((Path(entry.path), os.listdir(entry.path)))
        except OSError:
            continue
    return found


def spool_has_work(spool: Path) -> bool:
    """A complete segment waits, or a writer's folder was left by a writer that is gone."""
    return any(any(name.endswith(SEGMENT_SUFFIX) for name in names) or _writer_gone(folder)
               for folder, names in _writer_folders(spool))


def spool_wants_converter(spool: Path) -> bool:
    """:func:`spool_has_work`, or a live writer is appending to a segment (the converter's head start)."""
    if any(any(name.endswith(OPEN_SUFFIX) for name in names) for _, names in _writer_folders(spool)):
        return True
    return spool_has_work(spool)


class ConverterKeeper:
    """Runs the deployment's converter when the spool has work; see the module docstring."""

    def __init__(self, spool: Path, log_path: Path, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.spool = spool
        self.log_path = log_path
        self.idle_exit_s = idle_exit_s
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._next_check = 0.0
        self._started_at = -RESTART_PAUSE_S

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None and self.popen.poll() is None else None

    def tend(self, env: Callable[[], dict[str, str]]) -> None:
        """Start the converter if the spool has or is about to have work and none runs (called every
        tick; cheap)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_S
        if self.popen is not None:
            code = self.popen.poll()
            if code is None:
                return
            if code != 0:
                _logger.warning("Capture converter (pid %d) exited with %s; started again when segments wait",
                                self.popen.pid, code)
                self.restarts += 1
            self.popen = None
        if now < self._started_at + RESTART_PAUSE_S or not spool_wants_converter(self.spool):
            return
        self._start(env(), ["--parent", str(os.getpid()), "--idle-exit", f"{self.idle_exit_s:g}"])

    def _start(self, env: dict[str, str], options: list[str]) -> None:
        self._started_at = time.monotonic()
        # SIGTERM blocked through exec until the converter's handler is in place: stopped while
        # still importing, it makes its last pass all the same.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                self.popen = subprocess.Popen([sys.executable, "-m", CONVERTER_MODULE, str(self.spool), *options],
                                              stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        except OSError as exc:
            _logger.warning("Cannot start the capture converter: %s", exc)
            self.popen = None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def stop(self, env: Callable[[], dict[str, str]], timeout_s: float) -> None:
        """The last pass, once the workers are gone: everything left in the spool is converted
        (within ``timeout_s``; beyond it, what is left waits for the next start or ``delete``)."""
        deadline = time.monotonic() + timeout_s
        popen = self.popen
        if popen is not None and popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)  # one last pass over every folder, then it exits
            self._wait(popen, deadline)
        if spool_has_work(self.spool) and time.monotonic() < deadline:
            self._start(env(), ["--drain"])
            if self.popen is not None:
                self._wait(self.popen, deadline)
        self.popen = None

    def _wait(self, popen: subprocess.Popen[bytes], deadline: float) -> None:
        try:
            popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _logger.warning("Capture converter (pid %d) did not finish in time; killed. What it had not "
                            "converted stays in the spool for the next start (or delete).", popen.pid)
            popen.kill()
            popen.wait()
