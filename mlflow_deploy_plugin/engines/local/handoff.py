"""Handing the deployment's very listening socket to a successor supervisor (standard library only).

A supervisor started without an inherited socket (by the agent, or by `mlflow-deploy up`, while
the dead supervisor's workers still serve) must not bind a second socket beside theirs: when the
last old worker closes the old socket, the kernel resets every connection still waiting in its
accept queue. Instead it asks one of those workers for the socket itself:

- every serving worker (``--on-orphan serve``) listens on its own Unix-domain control socket,
  ``run/handoff/<pid>.sock`` (folder 0700, socket 0600: the deployment's owner only);
- the successor connects and asks ``handoff <deployment folder>``; the worker checks the peer
  (``SO_PEERCRED``: same uid, and the pid is a supervisor of this very deployment by its command
  line) and the folder named, both compared as folders, not strings (a home reached through a
  symlink is still this deployment), then sends a duplicate of its listening fd with ``SCM_RIGHTS``;
- the successor serves on it exactly as on a socket inherited with ``--fd``: one socket, so the
  old workers drain and nothing queued is lost.

Every step is bounded (``REQUEST_TIMEOUT_S``). A worker stops answering once it drains: its socket
is no longer what the deployment serves on, and its duplicate must not keep the socket open.

Imported by the supervisor and by the workers: keep it free of anything but the stdlib and
``processes``/``state``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mlflow_deploy_plugin.engines.local.processes import is_supervisor

REQUEST_TIMEOUT_S = 5.0  # connect + ask + receive, per worker asked
_ANSWER_TIMEOUT_S = 2.0  # a worker's wait for the question, and for its answer to go out
_ACCEPT_POLL_S = 0.5  # how often the worker's listener looks whether it was closed
_MAX_LINE = 4096
# sun_path holds 108 bytes including the final NUL; deeper folders are reached through the
# folder's descriptor (/proc/self/fd/N/...), which the kernel resolves like any path.
_MAX_UNIX_PATH = 107
_UCRED = struct.Struct("3i")  # pid, uid, gid


class HandoffRefused(OSError):
    """The worker asked did not hand its socket over (gone, refused, or no answer in time)."""


def handoff_dir(run_dir: Path) -> Path:
    return run_dir / "handoff"


def handoff_path(run_dir: Path, pid: int) -> Path:
    """The control socket of the worker ``pid``."""
    return handoff_dir(run_dir) / f"{pid}.sock"


@contextlib.contextmanager
def _unix_address(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits in ``sun_path`` (its folder's fd while the block runs)."""
    if len(os.fsencode(str(path))) <= _MAX_UNIX_PATH:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket."""
    return _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < _MAX_LINE:
        chunk = conn.recv(_MAX_LINE)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0]


def _same_folder(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


class HandoffServer:
    """A worker's side: hands a duplicate of its listening socket to its deployment's successor
    supervisor, and to nobody else. ``start`` binds; ``close`` stops answering and lets go of
    the duplicate (call it when the worker stops accepting)."""

    def __init__(self, path: Path, listen_fd: int, deployment_root: Path,
                 is_successor: Callable[[int], bool] | None = None) -> None:
        """``is_successor(pid)``: whether the peer may have the socket (default: it is a
        supervisor of the deployment at ``deployment_root``, by its command line)."""
        self.path = path
        self.root = deployment_root
        self.is_successor = is_successor or (lambda pid: is_supervisor(pid, deployment_root))
        self._fd: int | None = os.dup(listen_fd)  # ours: the serving code may close its own
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.handed_to: list[int] = []  # pids that received the socket

    def start(self) -> None:
        """Listen on the control socket (owner-only) and answer in a daemon thread."""
        folder = self.path.parent
        # Not parents=True: a deployment deleted meanwhile (its folder archived) must not come back.
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a dead process's socket with our pid
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _unix_address(self.path) as address:
                listener.bind(address)
            os.chmod(self.path, 0o600)
            listener.listen(8)
            listener.settimeout(_ACCEPT_POLL_S)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="socket-handoff", daemon=True)
        self._thread.start()

    def close(self, wait: bool = True) -> None:
        """Stop answering, let go of the socket's duplicate and remove the control socket.

        ``wait=False`` (from an event loop): do not wait for the answering thread, which ends
        within ``_ACCEPT_POLL_S`` by itself."""
        self._closed.set()
        with self._lock:  # never in the middle of a send
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=_ACCEPT_POLL_S + _ANSWER_TIMEOUT_S + 1.0)

    def _serve(self) -> None:
        listener = self._listener
        assert listener is not None
        try:
            while not self._closed.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                with conn, contextlib.suppress(OSError):
                    self._answer(conn)
        finally:
            listener.close()

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(_ANSWER_TIMEOUT_S)
        pid, uid, _ = peer_credentials(conn)
        verb, _, folder = _read_line(conn).decode(errors="replace").partition(" ")
        if uid != os.geteuid():
            why = f"peer uid {uid} is not ours"
        elif verb != "handoff" or not _same_folder(folder, self.root):
            why = "this socket serves another deployment"
        elif not self.is_successor(pid):
            why = f"pid {pid} is not a supervisor of this deployment"
        else:
            with self._lock:
                if self._fd is not None and not self._closed.is_set():
                    socket.send_fds(conn, [b"ok\n"], [self._fd])
                    self.handed_to.append(pid)
                    return
            why = "this worker is draining"
        conn.sendall(f"no {why}\n".encode())


def request_socket(path: Path, deployment_root: Path, timeout_s: float = REQUEST_TIMEOUT_S) -> int:
    """A successor's side: ask the worker behind ``path`` for its listening socket.

    Returns the received fd (the caller owns it); raises :class:`HandoffRefused` saying why not.
    """
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer within {timeout_s:g}s")
        return remaining

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(left())
            with _unix_address(path) as address:
                conn.connect(address)
            conn.settimeout(left())
            conn.sendall(f"handoff {deployment_root}\n".encode())
            conn.settimeout(left())
            message, fds, _, _ = socket.recv_fds(conn, _MAX_LINE, 1)
    except (OSError, ValueError) as exc:  # gone (no such socket, refused), no answer in time
        raise HandoffRefused(f"{path.name}: {exc}") from None
    if message.startswith(b"ok") and len(fds) == 1:
        return fds[0]
    for fd in fds:
        os.close(fd)
    answer = message.decode(errors="replace").strip() or "no answer"
    raise HandoffRefused(f"{path.name}: {answer.removeprefix('no ')}")
