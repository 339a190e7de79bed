"""A bounded way out of a foreground run (``run-local``): Ctrl-C always stops it, in a known time.

What a foreground run calls on its way out can block without end: Ray's calls (``ray.get`` on a
busy Serve controller, a GCS request, ``ray.shutdown()`` at interpreter exit) carry no deadline of
their own. Three pieces keep the exit bounded:

- :func:`wait_until_interrupted` waits for Ctrl-C in short timed waits. One untimed wait
  (``threading.Event().wait()``) blocks in ``sem_wait``, which a signal interrupts only when the
  kernel delivers it to the main thread; delivered to one of Ray's threads (the main thread busy
  with another pending signal), Python's handler only flags it, and the main thread, never woken,
  never raised KeyboardInterrupt. A timed wait returns to Python every ``poll_s``, which runs the
  flagged handler in the main thread.
- :func:`call_within` runs one call on a daemon thread and waits for it at most ``timeout_s``
  (:class:`Overran` then); the caller waits in timed waits too, so a second Ctrl-C reaches it at
  once even while the call is stuck in C++ code that never checks for signals.
- :func:`arm_exit_watchdog` bounds what is left once the command's work is done (``atexit``
  handlers such as ``ray.shutdown()``, Ray's ``sys.excepthook``, which reports an uncaught error
  to the GCS): if the process still runs ``grace_s`` later it writes every thread's stack to
  stderr and ends with the code it was going to end with. Only a process that *is* MLflow's CLI
  running ``mlflow deployments run-local`` arms it (``sys.argv`` says so): a program calling
  ``run_local`` through the Python API, or MLflow's command object in process (its MCP server,
  click's CliRunner), keeps its process.

:func:`dump_stacks_on_sigusr1` makes a stuck process say where it is (``kill -USR1 <pid>``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL_S = 0.25  # how soon a Ctrl-C flagged on another thread is raised in the main thread
# After the watchdog's own deadline, faulthandler's C thread (it needs no GIL, so it also ends a
# process stuck in C code holding the GIL, or past the point where Python threads stop) ends it.
BACKSTOP_S = 5.0
# What a CLI process may take to exit once its work is done (atexit handlers, ray.shutdown(): well
# under a second when the cluster answers; the interpreter's teardown of MLflow's and Ray's modules).
EXIT_GRACE_S = 30.0


class Overran(Exception):
    """A bounded call did not return within its time; ``what`` names it."""

    def __init__(self, what: str, timeout_s: float) -> None:
        super().__init__(f"{what} did not finish within {timeout_s:g}s")
        self.what, self.timeout_s = what, timeout_s


def wait_until_interrupted(poll_s: float = POLL_S) -> None:
    """Block until Ctrl-C (KeyboardInterrupt), whichever thread the kernel delivers SIGINT to."""
    never = threading.Event()
    while not never.wait(poll_s):
        pass


def call_within(call: Callable[[], T], timeout_s: float, what: str) -> T:
    """``call()``'s result (or its exception), or :class:`Overran` once ``timeout_s`` passes.

    The call runs on a daemon thread: past the deadline it is left running (it cannot be stopped
    from outside; a daemon thread does not hold up the process's exit). KeyboardInterrupt reaches
    the caller while it waits."""
    done = threading.Event()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the caller, whatever it is
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=f"bounded: {what}", daemon=True).start()
    deadline = time.monotonic() + max(0.0, timeout_s)
    while not done.wait(min(POLL_S, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            raise Overran(what, timeout_s)
    if failure:
        raise failure[0]
    return outcome[0]


# faulthandler writes to descriptor 2, not sys.stderr (which may be None, or a StringIO of a caller
# that redirects output); a closed descriptor is tolerated: these are diagnostics, never a failure.
_NO_FD = (AttributeError, ValueError, io.UnsupportedOperation, RuntimeError, OSError)


def is_cli_run_local(argv: list[str] | None = None) -> bool:
    """Whether this process is MLflow's CLI running ``mlflow deployments run-local`` (``sys.argv``:
    a program calling the command in process, or through the Python API, leaves it alone)."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return False
    program = argv[0]
    is_mlflow = (os.path.basename(program) in ("mlflow", "mlflow.exe")
                 or program.endswith(os.path.join("mlflow", "__main__.py")))
    return is_mlflow and "deployments" in argv[1:] and "run-local" in argv[1:]


def dump_stacks_on_sigusr1() -> None:
    """Write every thread's stack to stderr on SIGUSR1 (``kill -USR1 <pid>``), the process going on."""
    with contextlib.suppress(*_NO_FD):
        faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)


def arm_exit_watchdog(grace_s: float, code: int, what: str) -> None:
    """End this process with ``code`` if it still runs ``grace_s`` from now, after writing to stderr
    that ``what`` is done but the process did not exit, and every thread's stack (where it hangs)."""
    with contextlib.suppress(*_NO_FD):
        faulthandler.dump_traceback_later(grace_s + BACKSTOP_S, exit=True, file=2)

    def end() -> None:
        threading.Event().wait(grace_s)
        # os.write, not print: sys.stderr's lock may be held by the thread that hangs.
        os.write(2, (f"\n{what}, but the process had not exited {grace_s:g}s later (where each thread is, "
                     f"below); exiting with code {code}.\n").encode())
        with contextlib.suppress(*_NO_FD):
            faulthandler.dump_traceback(file=2, all_threads=True)
        os._exit(code)

    threading.Thread(target=end, name="exit-watchdog", daemon=True).start()
