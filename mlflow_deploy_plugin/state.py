"""Where deployments, their status and history are kept: ``$MLFLOW_DEPLOY_HOME``.

Layout (one folder per deployment, so deleting one never touches another)::

    $MLFLOW_DEPLOY_HOME/
      .lock                          # serialises create/delete across CLI processes
      deployments/<name>/
        deployment.json              # what should run (written by the CLI / supervisor)
        status.json                  # what runs (written by the supervisor only)
        history.jsonl                # append-only events, oldest first
        requests/                    # CLI -> supervisor requests and their answers
        logs/                        # supervisor and worker logs
        models/<model>/<version>/    # local copy of each served model version
        capture/                     # captured traffic (Parquet)
        capture.key                  # secret of -C capture_hash (created when first needed)
        notify.key, notify/          # signing secret, cursors and deliveries of -C notify
        verdicts.json                # latest drift/quality/shadow figures (Prometheus gauges)
      archive/<name>-<utc time>/     # deleted deployments: captured data and history are kept

Captured inputs, logs and history are user data: folders this module creates are 0700 and files
0600 whatever the caller's umask (the supervisor and its workers run with umask 077 as well).

This module is imported by the supervisor process, so it must stay free of heavy imports
(standard library and ``spec`` only).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.spec import DeploymentSpec, load_spec

_logger = logging.getLogger(__name__)
DEPLOY_HOME_ENV = "MLFLOW_DEPLOY_HOME"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # used with fullmatch: "$" would admit "name\n"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

STATUS_STARTING = "starting"
STATUS_RUNNING = "running"
STATUS_UNHEALTHY = "unhealthy"
STATUS_FAILED = "failed"
STATUS_STOPPED = "stopped"


def deploy_home() -> Path:
    """The root folder of all deployment state (``$MLFLOW_DEPLOY_HOME``, default ~/.mlflow-deploy)."""
    return Path(os.environ.get(DEPLOY_HOME_ENV) or Path.home() / ".mlflow-deploy").expanduser().resolve()


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid deployment name, else raise ValueError saying why."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"Invalid deployment name {name!r}: use 1-63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit."
        )
    return name


def make_private_dirs(path: Path) -> None:
    """``mkdir -p`` whose new folders are 0700 (existing ones are left as they are)."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by another process
        os.chmod(folder, PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask


def read_or_create_secret(path: Path) -> str:
    """The secret kept in ``path`` (0600), created on first use; safe when processes race to create it.

    The secret is written to a private temp file and hard-linked into place, so a reader never sees
    a half-written key and two creators agree on one.
    """
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if text := path.read_text().strip():
            return text
    make_private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see either the old or the new file, never a partial one."""
    make_private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any | None:
    """The parsed JSON at ``path``, or None when it does not exist."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def read_history_file(path: Path) -> list[dict[str, Any]]:
    """The events of a ``history.jsonl`` (a live or an archived deployment's), oldest first.

    A line torn by a crash mid-write is skipped with a warning: it must never break `history`,
    `rollback` or the lifecycle controller, which all read this file.
    """
    if not path.exists():
        return []
    events = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            _logger.warning("Skipping unreadable line %d of %s (torn by a crash?): %.80s", number, path, line)
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
        else:
            _logger.warning("Skipping line %d of %s: not a history event", number, path)
    return events


def append_history_file(path: Path, event: str, **details: Any) -> None:
    """Append one event to a ``history.jsonl`` (a live or an archived deployment's), durably."""
    line = (json.dumps({"time": time.time(), "event": event, **details}, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        # Writers (supervisor, agent, CLI) take turns: the torn-line check and the write must see
        # the same end of file. Released when the descriptor closes; never nested, so never a deadlock.
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # the last write was torn: never glue this event onto it
        os.write(fd, line)  # one write with O_APPEND: lines of concurrent writers never interleave
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = 120.0) -> Iterator[None]:
    """An exclusive advisory lock shared by every process on this machine."""
    make_private_dirs(path.parent)
    with open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE), "a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"Timed out after {timeout_s:.0f}s waiting for lock {path}; another "
                        "mlflow-deploy command may be stuck holding it."
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@dataclass(frozen=True)
class DeploymentPaths:
    """The files of one deployment."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def spec(self) -> Path:
        return self.root / "deployment.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def requests(self) -> Path:
        return self.root / "requests"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def capture(self) -> Path:
        return self.root / "capture"

    @property
    def poke(self) -> Path:
        """Touching this file makes the deployment's agent look at the registry at once."""
        return self.root / "run" / "poke"

    @property
    def metrics(self) -> Path:
        """Prometheus multiprocess files shared by the workers."""
        return self.root / "run" / "prometheus"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def capture_key(self) -> Path:
        """The secret keying ``-C capture_hash`` (0600, created when first needed)."""
        return self.root / "capture.key"

    @property
    def notify(self) -> Path:
        """Notifications out (``-C notify``): per-receiver cursors and ``deliveries.jsonl``."""
        return self.root / "notify"

    @property
    def notify_key(self) -> Path:
        """The secret signing notifications when ``-C notify_secret_env`` is not set (0600)."""
        return self.root / "notify.key"

    @property
    def verdicts(self) -> Path:
        """Latest drift / quality / shadow figures per version, read by /metrics on each scrape."""
        return self.root / "verdicts.json"


class StateStore:
    """Reads and writes deployment state under one home folder."""

    def __init__(self, home: Path | None = None) -> None:
        # Resolved, as deploy_home() is: every process of a deployment names its folder by this path
        # (command lines, the handoff's peer check), so one folder must have one spelling.
        self.home = Path(home).expanduser().resolve() if home else deploy_home()

    @property
    def deployments_dir(self) -> Path:
        return self.home / "deployments"

    def paths(self, name: str) -> DeploymentPaths:
        return DeploymentPaths(self.deployments_dir / validate_name(name))

    def global_lock(self) -> contextlib.AbstractContextManager[None]:
        """Serialises name-space changes (create, delete) across processes."""
        return file_lock(self.home / ".lock")

    def exists(self, name: str) -> bool:
        return self.paths(name).spec.exists()

    def names(self) -> list[str]:
        if not self.deployments_dir.exists():
            return []
        return sorted(p.name for p in self.deployments_dir.iterdir() if (p / "deployment.json").exists())

    def read_spec(self, name: str) -> DeploymentSpec | None:
        """The stored spec of ``name`` (None if there is none; SpecError if it is unreadable)."""
        return load_spec(self.paths(name).spec)

    def write_spec(self, spec: DeploymentSpec) -> None:
        paths = self.paths(spec.name)
        write_json_atomic(paths.spec, spec.to_dict())
        # Captured inputs are user data: also a folder made by an older version becomes private.
        os.chmod(paths.root, PRIVATE_DIR_MODE)

    def read_status(self, name: str) -> dict[str, Any] | None:
        return read_json(self.paths(name).status)

    def append_history(self, name: str, event: str, **details: Any) -> None:
        """Record one event of a live deployment."""
        paths = self.paths(name)
        make_private_dirs(paths.root)
        append_history_file(paths.history, event, **details)

    def read_history(self, name: str) -> list[dict[str, Any]]:
        return read_history_file(self.paths(name).history)

    def archive(self, name: str) -> Path:
        """Move a deployment's folder aside, keeping its captured data and history."""
        paths = self.paths(name)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.home / "archive" / f"{name}-{stamp}"
        make_private_dirs(target.parent)
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.with_name(f"{name}-{stamp}-{suffix}")
        os.replace(paths.root, target)
        return target
