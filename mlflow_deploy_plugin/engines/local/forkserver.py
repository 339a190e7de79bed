"""Workers forked from the warm standby, so they share its pages (standard library only).

Every worker of a deployment imports the same ~3000 modules (MLflow, pandas, Arrow, scikit-learn,
FastAPI): ~100 MiB of Python objects per interpreter. Started as fresh interpreters, a worker and
the warm standby each held a private copy of them. Instead the warm standby, once its imports are
done, is a *fork server*: the supervisor asks it for each worker, it forks, and the child runs the
worker's ``main`` on the pipes and socket the supervisor handed over. Parent and children share the
imported pages copy-on-write (the standby froze them out of the cyclic GC first, so a collection does
not write to every page), and proportional set size (PSS) splits them between the processes that
map them: the standby then costs what it does not share, a few MiB, not a second interpreter.

The children must still be the supervisor's: it reaps them, reads their exit status (a crash, an OOM
kill) and outlives the standby. So the supervisor makes itself a *child subreaper*
(``prctl(PR_SET_CHILD_SUBREAPER)``), the standby forks twice and the middle process exits at once:
the worker is adopted by the supervisor, its nearest subreaper, before the standby even answers
with its pid. Killing the standby then leaves its workers serving, as before.

The two talk on a Unix socket pair (``SOCK_SEQPACKET``: one message per request): the supervisor
sends a JSON request with the worker's file descriptors attached (``SCM_RIGHTS``), the standby
answers ``{"pid": N}`` or ``{"error": "..."}``. A standby that cannot fork (gone, or not answering
within :data:`FORK_TIMEOUT_S`) leaves the supervisor to start a fresh interpreter, as without one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import IO

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
FORK_TIMEOUT_S = 10.0  # a standby busy elsewhere (a fork takes milliseconds) is given this long
ADOPT_TIMEOUT_S = 5.0  # how long a forked worker waits to be adopted by the supervisor
_MAX_MESSAGE = 1 << 20
# The worker's descriptors, in the order they are attached to a fork request.
FD_NAMES = ("listen", "ready", "stdin", "log")
# Exit code of a forked worker whose status the supervisor could not read (someone else reaped it).
UNKNOWN_EXIT = 255


class ForkError(OSError):
    """The standby did not fork the worker asked for (the supervisor starts a fresh one instead)."""


class ForkRefused(ForkError):
    """The standby answered that it cannot fork (it would again: the supervisor stops asking it)."""


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4); False if it cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def reap_adopted(known: set[int]) -> list[int]:
    """Reap the children that exited and that no handle of ours waits for (as a subreaper we adopt
    orphaned descendants, e.g. a killed worker's shadow process); returns their pids."""
    reaped = []
    for pid in _children() - known:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                reaped.append(pid)
    return reaped


def _children() -> set[int]:
    """Our children's pids: one small read of ``/proc/<pid>/task/<tid>/children`` per thread (the
    supervisor has one), not a walk over every process of the machine."""
    pids: set[int] = set()
    read_any = False
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{os.getpid()}/task/{task}/children") as handle:
            pids.update(int(pid) for pid in handle.read().split())
            read_any = True
    return pids if read_any else _children_by_parent()


def _children_by_parent() -> set[int]:
    """Our children from every process's ``stat`` (a kernel built without CONFIG_PROC_CHILDREN has no
    ``children`` files): slower, but adopted orphans are still reaped."""
    me, pids = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{entry}/stat") as handle:
                if int(handle.read().rsplit(")", 1)[1].split()[1]) == me:  # field 4, after "(comm)"
                    pids.add(int(entry))
    return pids


class ForkedChild:
    """The supervisor's handle on a worker the standby forked: the part of ``subprocess.Popen`` the
    supervisor uses (``pid``, ``stdin``, ``poll``, ``wait``, signals, ``returncode``), on ``waitpid``.
    It works because the supervisor adopted the worker (:func:`become_subreaper`)."""

    def __init__(self, pid: int, stdin_fd: int) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = os.fdopen(stdin_fd, "wb")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not (or no longer) ours to wait for: gone, status unknown
                self._ended(UNKNOWN_EXIT)
            else:
                if pid:
                    self._ended(os.waitstatus_to_exitcode(status))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _ended(self, code: int) -> None:
        self.returncode = code
        if self.stdin is not None:
            with contextlib.suppress(OSError):
                self.stdin.close()


def channel() -> tuple[socket.socket, socket.socket]:
    """A (supervisor end, standby end) pair; the standby's end is inheritable, to pass to it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    return ours, theirs


def request_fork(sock: socket.socket, args: list[str], env: dict[str, str], fds: dict[str, int],
                 timeout_s: float = FORK_TIMEOUT_S) -> int:
    """Supervisor side: ask the standby on ``sock`` to fork a worker running ``args`` (the worker's
    command-line arguments but ``--fd``/``--ready-fd``, which the child gets from ``fds``) with the
    environment ``env``; returns the worker's pid. Raises :class:`ForkError`."""
    message = json.dumps({"args": args, "env": env}).encode()
    try:
        socket.send_fds(sock, [message], [fds[name] for name in FD_NAMES])
        ready, _, _ = select.select([sock], [], [], timeout_s)
        if not ready:
            raise ForkError(f"the warm standby did not fork a worker within {timeout_s:g}s")
        reply = sock.recv(_MAX_MESSAGE)
    except OSError as exc:
        if isinstance(exc, ForkError):
            raise
        raise ForkError(f"cannot reach the warm standby: {exc}") from exc
    if not reply:
        raise ForkError("the warm standby is gone")
    try:
        answer = json.loads(reply)
    except ValueError as exc:
        raise ForkError(f"the warm standby answered something else than JSON: {reply[:80]!r}") from exc
    if isinstance(answer, dict) and "error" in answer:
        raise ForkRefused(f"the warm standby could not fork a worker: {answer['error']}")
    pid = answer.get("pid") if isinstance(answer, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise ForkError(f"the warm standby answered no worker pid: {reply[:80]!r}")
    return pid


@dataclass(frozen=True)
class ChildWork:
    """What a forked worker runs: its command-line arguments (descriptors in place)."""

    argv: list[str]


def serve(sock: socket.socket, close_in_child: tuple[int, ...] = ()) -> ChildWork | None:
    """Standby side: fork a worker per request on ``sock`` until the supervisor closes it (None).

    Returns :class:`ChildWork` *in the forked worker only*, after it has been adopted by the
    supervisor, its stdin/stdout/stderr put in place and the standby's own descriptors
    (``sock`` and ``close_in_child``) closed: the caller then runs the worker as if started afresh.
    The standby itself never returns until it is released. Fork only with no other thread running.
    """
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, len(FD_NAMES))
        except InterruptedError:
            continue
        except OSError:
            return None
        if not message:
            return None  # the supervisor closed its end (released us, or died)
        received = dict(zip(FD_NAMES, fds, strict=False))
        pid, work = 0, None
        try:
            request = json.loads(message)
            if len(received) != len(FD_NAMES):
                raise ValueError(f"expected {len(FD_NAMES)} descriptors, got {len(fds)}")
            pid, work = _fork(request, received, sock, close_in_child)
        except Exception as exc:  # noqa: BLE001 - answered, never raised: the supervisor falls back
            with contextlib.suppress(OSError):
                sock.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        finally:
            if pid != -1:  # in the standby: the worker has its copies now
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        if work is not None:
            return work
        if pid > 0:
            with contextlib.suppress(OSError):
                sock.send(json.dumps({"pid": pid}).encode())


def _fork(request: dict, fds: dict[str, int], sock: socket.socket,
          close_in_child: tuple[int, ...]) -> tuple[int, ChildWork | None]:
    """Fork twice: ``(worker pid, None)`` in the standby, ``(-1, work)`` in the worker."""
    if threading.active_count() > 1:
        # A fork copies only the calling thread: a lock another thread held (logging's, the import
        # lock, a library's) stays held forever in the child. Refused: the supervisor then starts a
        # fresh interpreter, as without a forking standby.
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread())
        raise ForkError(f"the standby runs other threads ({names}); a forked worker could inherit their locks")
    pid_read, pid_write = os.pipe()
    middle = os.fork()
    if middle == 0:  # the middle process: fork the worker, tell its pid, exit so it is adopted
        worker = -1
        middle_pid = os.getpid()  # read here: the worker may first look after this process is gone
        try:
            os.close(pid_read)
            worker = os.fork()
            if worker > 0:
                os.write(pid_write, str(worker).encode())
        finally:
            if worker != 0:
                os._exit(0)  # never unwind the standby's stack in the middle process
        os.close(pid_write)
        return -1, _become_worker(request, fds, sock, close_in_child, middle_pid)
    os.close(pid_write)
    try:
        with os.fdopen(pid_read, "rb") as pipe:
            told = pipe.read()
    finally:
        os.waitpid(middle, 0)
    if not told:
        raise ForkError("the forked worker's pid was not told")
    return int(told), None


def _become_worker(request: dict, fds: dict[str, int], sock: socket.socket,
                   close_in_child: tuple[int, ...], middle: int) -> ChildWork:
    """In the worker: wait until the supervisor adopted us (our parent, the middle process, exits at
    once; the worker's orphan check compares its parent with the one it started under), then put its
    descriptors in place."""
    try:
        # ``middle`` is the pid the middle process had, not our first getppid(): it may have exited
        # (and we been adopted) before this line, and waiting for the adopter to change would then
        # cost the whole ADOPT_TIMEOUT_S.
        deadline = time.monotonic() + ADOPT_TIMEOUT_S
        while os.getppid() == middle and time.monotonic() < deadline:
            time.sleep(0.001)
        sock.close()
        for fd in close_in_child:
            with contextlib.suppress(OSError):
                os.close(fd)
        os.dup2(fds["stdin"], 0)
        os.dup2(fds["log"], 1)
        os.dup2(fds["log"], 2)
        for name in ("stdin", "log"):
            os.close(fds[name])
        for name in ("listen", "ready"):
            os.set_inheritable(fds[name], True)
        os.environ.clear()
        os.environ.update(request["env"])
        return ChildWork([*request["args"], "--fd", str(fds["listen"]), "--ready-fd", str(fds["ready"])])
    except BaseException:
        os._exit(70)  # noqa: SLF001 - the worker cannot run; the supervisor reaps and reports it
