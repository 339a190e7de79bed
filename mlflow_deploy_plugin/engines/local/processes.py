"""Which processes belong to a local deployment, and who may supervise it (standard library only).

Every process of a deployment is recognised by its command line, never by pid alone: after a
reboot ``status.json`` may name pids that now belong to unrelated processes, which must never be
reported as running, let alone signalled.

Exactly one supervisor runs per deployment: it holds an exclusive ``flock`` on
``run/supervisor.lock`` for its whole life. The kernel drops the lock when the process dies, however
it dies, so whoever takes it next (a new supervisor started by an orphaned worker, by the agent, by
`mlflow-deploy up` or by `create`) knows the previous one is gone, and two can never run at once.

Imported by the supervisor, the workers and the agent: keep it free of anything but the stdlib
and ``state``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from mlflow_deploy_plugin.state import PRIVATE_FILE_MODE, DeploymentPaths, pid_alive

# What each early supervisor (``spawn_supervisor(wait_for_go=True)``) wrote before its go, by pid.
_EARLY_OUTPUT: dict[int, IO[bytes]] = {}

SUPERVISOR_MODULE = "mlflow_deploy_plugin.engines.local.supervisor"
WORKER_MODULE = "mlflow_deploy_plugin.serving.worker"
AGENT_MODULE = "mlflow_deploy_plugin.agent"
SHADOW_MODULE = "mlflow_deploy_plugin.engines.local.shadow_process"
# Supervisors started before the engines/local/ layout run under their old module name; they speak
# the same mailbox and status files, so they must still be recognised after an upgrade.
_SUPERVISOR_MODULES = (SUPERVISOR_MODULE.encode(), b"mlflow_deploy_plugin.engines.supervisor")


def supervisor_lock_path(paths: DeploymentPaths) -> Path:
    return paths.root / "run" / "supervisor.lock"


def _cmdline(pid: int | None) -> list[bytes]:
    if not pid_alive(pid):
        return []
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")
    except OSError:
        return []


def _path_args(pid: int | None, argv: list[bytes]) -> list[Path]:
    """The command-line arguments of ``pid`` that may be paths, as the process itself resolves them
    (a relative one against its working directory)."""
    if pid is None:
        return []
    cwd = Path(f"/proc/{pid}/cwd")
    return [cwd / os.fsdecode(arg) for arg in argv if arg and not arg.startswith(b"-")]


def _names_folder(pid: int | None, argv: list[bytes], root: Path) -> bool:
    """Whether one of ``argv``'s arguments is the folder ``root`` itself.

    The same folder is not always spelled the same: ``$MLFLOW_DEPLOY_HOME`` reached through a
    symlink (``up`` from cron, the plugin from a shell) gives two spellings of one folder, and a
    supervisor that refused its own deployment's socket would bind beside its workers (resetting
    what waits in their queue). So after the plain string match, compare the folders themselves
    (device and inode).
    """
    if str(root).encode() in argv:
        return True
    try:
        wanted = os.stat(root)
    except OSError:
        return False
    for arg in _path_args(pid, argv):
        try:
            found = os.stat(arg)
        except OSError:
            continue
        if (found.st_dev, found.st_ino) == (wanted.st_dev, wanted.st_ino):
            return True
    return False


def _names_file_under(pid: int | None, argv: list[bytes], root: Path) -> bool:
    """Whether one of ``argv``'s arguments is a path inside the folder ``root`` (symlinks resolved,
    as in :func:`_names_folder`)."""
    prefix = str(root).encode() + b"/"
    if any(arg.startswith(prefix) for arg in argv):
        return True
    try:
        real_root = root.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    for arg in _path_args(pid, argv):
        try:
            if arg.resolve().is_relative_to(real_root):
                return True
        except (OSError, RuntimeError):
            continue
    return False


def is_supervisor(pid: int | None, root: Path) -> bool:
    """Whether ``pid`` is alive AND is the supervisor of the deployment at ``root`` (however either
    spells the folder's path)."""
    argv = _cmdline(pid)
    return any(module in argv for module in _SUPERVISOR_MODULES) and _names_folder(pid, argv, root)


def is_worker(pid: int | None, root: Path) -> bool:
    """Whether ``pid`` is alive AND is a serving worker (or warm standby) of the deployment at ``root``.

    A worker's command line names its generation file, which lives under the deployment's folder.
    """
    argv = _cmdline(pid)
    return WORKER_MODULE.encode() in argv and _names_file_under(pid, argv, root)


def is_agent(pid: int | None, root: Path) -> bool:
    """Whether ``pid`` is alive AND is the background agent of the deployment at ``root``."""
    argv = _cmdline(pid)
    return AGENT_MODULE.encode() in argv and _names_folder(pid, argv, root)


def is_shadow_child(pid: int | None, worker_pid: int) -> bool:
    """Whether ``pid`` is alive AND is the shadow process worker ``worker_pid`` started (its command
    line names its worker: ``--parent-pid``)."""
    argv = _cmdline(pid)
    if SHADOW_MODULE.encode() not in argv or b"--parent-pid" not in argv:
        return False
    at = argv.index(b"--parent-pid") + 1
    return at < len(argv) and argv[at] == str(worker_pid).encode()


def status_pids(status: dict[str, Any], *keys: str) -> list[int]:
    """The pids ``status.json`` lists under ``keys`` (single pids or lists), in order, no repeats."""
    found: list[int] = []
    for key in keys:
        value = status.get(key)
        for pid in value if isinstance(value, list) else [value]:
            if isinstance(pid, int) and pid > 0 and pid not in found:
                found.append(pid)
    return found


WORKER_KEYS = ("worker_pids", "other_pids", "standby_pid")


def live_workers(status: dict[str, Any], root: Path) -> list[int]:
    """Workers ``status.json`` names that still run (verified by command line)."""
    return [pid for pid in status_pids(status, *WORKER_KEYS) if is_worker(pid, root)]


def take_supervisor_lock(paths: DeploymentPaths, wait_s: float = 0.0) -> int | None:
    """The fd holding the deployment's supervisor lock, or None if another process holds it.

    Never creates the deployment's folders: a deployment deleted (archived) meanwhile has no
    ``run/`` folder any more, and must not be brought back by a late supervisor.
    """
    try:
        fd = os.open(supervisor_lock_path(paths), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def supervisor_lock_held(paths: DeploymentPaths) -> bool:
    """Whether a supervisor holds the deployment's lock now (a probe that takes it for an instant)."""
    try:
        fd = os.open(supervisor_lock_path(paths), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we got
    return False


def spawn_supervisor(paths: DeploymentPaths, *, respawn: bool, fd: int | None = None,
                     wait_for_go: bool = False) -> subprocess.Popen[bytes]:
    """Start a detached supervisor for the deployment at ``paths`` (its own session, logs appended).

    ``respawn``: started by an orphaned worker or agent, not by a person: it does nothing if the
    deployment was stopped or deleted meanwhile. ``fd``: a listening socket to serve on (the one
    the orphaned workers serve on), so the port is never closed, not even for an instant.
    ``wait_for_go``: started before the deployment's folder is ready (``create`` resolving the model
    meanwhile): it imports, then waits for ``go`` on its stdin (:func:`tell_supervisor_go`) before
    it touches anything of the deployment, its log included; end of file instead makes it exit.
    Until then what it writes (an import error of a broken environment) goes to an unlinked
    temporary file (not a pipe: nobody reads before "go", and a full pipe would block its writes, so
    it would never read its go): :func:`early_output` reads its end, for the deployment's log.
    """
    argv = [sys.executable, "-m", SUPERVISOR_MODULE, str(paths.root)]
    if respawn:
        argv.append("--respawn")
    if fd is not None:
        argv += ["--fd", str(fd)]
    if wait_for_go:
        argv.append("--wait-for-go")
        early = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for early_output, closed there
        try:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=early, stderr=subprocess.STDOUT,
                                       start_new_session=True, umask=0o077)
        except BaseException:
            early.close()
            raise
        _EARLY_OUTPUT[process.pid] = early
        return process
    log_fd = os.open(paths.logs / "supervisor.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
    with open(log_fd, "ab") as log:
        # umask 077: everything the supervisor, its workers and its agent create (logs, captured
        # inputs, model copies, metrics files) is readable by the deployment's owner only.
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                pass_fds=(fd,) if fd is not None else (), umask=0o077)


def tell_supervisor_go(process: subprocess.Popen[bytes]) -> bool:
    """Let a supervisor started ``wait_for_go`` run; False if it is gone (start another then)."""
    if process.stdin is None or process.poll() is not None:
        return False
    try:
        process.stdin.write(b"go\n")
        process.stdin.close()
    except OSError:  # it died meanwhile
        return False
    return True


def early_output(process: subprocess.Popen[bytes], max_bytes: int = 64 * 1024) -> str:
    """The end (last ``max_bytes``) of what a supervisor started ``wait_for_go`` wrote before it
    logged to its deployment's log (an error's last lines are what says it), and close our copy of
    that file; "" for a supervisor started with its log, or asked a second time."""
    early = _EARLY_OUTPUT.pop(process.pid, None)
    if early is None:
        return ""
    with early:
        try:
            size = early.seek(0, os.SEEK_END)
            early.seek(max(0, size - max_bytes))
            return early.read().decode(errors="replace")
        except OSError:
            return ""


def wait_workers_gone(pids: list[int], root: Path, timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` is a worker of the deployment at ``root`` any more (a zombie
    counts as gone), for at most ``timeout_s``; returns those still running then.

    ``kill`` returns before a SIGKILL has stopped its target (at once, unless it is in an
    uninterruptible wait such as a write to a slow disk): what the process leaves behind, e.g. the
    capture tally in its liveness file, is final only once it is gone.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        pids = [pid for pid in pids if is_worker(pid, root)]
        if not pids or time.monotonic() >= deadline:
            return pids
        time.sleep(0.01)


def signal_pid(pid: int, signum: int) -> bool:
    """Send ``signum`` to ``pid``; False if it is gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def reap_quietly(process: subprocess.Popen[bytes] | None) -> bool:
    """Whether ``process`` has ended (reaping it, so no zombie lingers)."""
    if process is None:
        return True
    with contextlib.suppress(OSError):
        return process.poll() is not None
    return True
