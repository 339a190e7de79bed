"""The bounded way out of a foreground run (``bounded_exit.py``), with calls that never return.

Ctrl-C is a real SIGINT, sent with ``pthread_kill`` to a helper thread, not to the main thread:
the kernel may deliver a process's SIGINT to any of its threads (Ray's driver has dozens), and
Python then only flags it for the main thread. The exit watchdog ends real processes (``python
-c``, importing nothing but the module), one stuck without the GIL and one stuck holding it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlflow_deploy_plugin.bounded_exit import Overran, call_within, wait_until_interrupted

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt here, as in a terminal (an xdist worker may have changed it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_on_another_thread() -> None:
    """Deliver SIGINT to a new thread (not the main one), as the kernel may for a process's signal."""
    threading.Thread(target=lambda: signal.pthread_kill(threading.get_ident(), signal.SIGINT), daemon=True).start()


def test_call_within_hands_back_the_result_and_the_exception() -> None:
    assert call_within(lambda: 42, 30, "answering") == 42
    with pytest.raises(ZeroDivisionError):
        call_within(lambda: 1 / 0, 30, "dividing")


def test_a_call_that_never_returns_overruns_its_bound_and_is_named() -> None:
    never = threading.Event()
    try:
        with pytest.raises(Overran, match=r"asking Serve's controller did not finish within 0\.3s") as caught:
            call_within(never.wait, 0.3, "asking Serve's controller")
        assert caught.value.what == "asking Serve's controller"
        # A spent budget overruns at once rather than starting a wait of its own.
        with pytest.raises(Overran):
            call_within(never.wait, -5, "the next step")
    finally:
        never.set()  # the threads left behind return


def test_ctrl_c_on_another_thread_ends_the_wait_for_it(ctrl_c: None) -> None:
    # One untimed Event().wait() never raised here: the main thread slept in sem_wait, never woken.
    with pytest.raises(KeyboardInterrupt):
        _ctrl_c_on_another_thread()
        wait_until_interrupted()


def test_ctrl_c_reaches_the_caller_of_a_call_that_never_returns(ctrl_c: None) -> None:
    never = threading.Event()
    try:
        with pytest.raises(KeyboardInterrupt):
            _ctrl_c_on_another_thread()
            call_within(never.wait, 600, "waiting for Serve")  # a second Ctrl-C, not the bound, ends it
    finally:
        never.set()


WATCHDOG = """
import ctypes, sys, threading
from mlflow_deploy_plugin.bounded_exit import arm_exit_watchdog
arm_exit_watchdog(0.5, 3, "the work is done")
if sys.argv[1] == "holding-the-gil":
    ctypes.PyDLL(None).pause()  # libc's pause() called the PyDLL way: the GIL held while it blocks
else:
    threading.Event().wait()  # as a stuck atexit handler: the GIL released
"""


def _stuck_process(how: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WATCHDOG, how], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_the_exit_watchdog_ends_a_stuck_process_saying_where_it_was() -> None:
    ended = _stuck_process("releasing-the-gil")
    assert ended.returncode == 3, ended
    assert "the work is done, but the process had not exited 0.5s later" in ended.stderr, ended.stderr
    assert "exiting with code 3" in ended.stderr
    assert 'File "<string>", line 8' in ended.stderr, ended.stderr  # the main thread's stack: the wait


def test_the_exit_watchdogs_backstop_ends_a_process_stuck_holding_the_gil() -> None:
    ended = _stuck_process("holding-the-gil")
    assert ended.returncode == 1, ended  # faulthandler's exit: the watchdog thread never got the GIL
    assert "Timeout (0:00:05.500000)!" in ended.stderr, ended.stderr
    assert 'File "<string>", line 6' in ended.stderr, ended.stderr  # where it was: in pause()


@pytest.mark.parametrize(("argv", "expected"), [
    (["/venv/bin/mlflow", "deployments", "run-local", "-t", "lifecycle", "--name", "x"], True),
    (["/venv/lib/python3.11/site-packages/mlflow/__main__.py", "deployments", "run-local"], True),
    (["/venv/bin/mlflow", "mcp", "run"], False),  # MLflow's MCP server calls the command in process
    (["/venv/bin/jupyter-lab"], False),
    (["/venv/bin/pytest", "tests/test_cli_verbs.py"], False),  # click's CliRunner
    ([], False),
])
def test_only_the_mlflow_cli_running_run_local_counts_as_the_cli(argv: list[str], expected: bool) -> None:
    from mlflow_deploy_plugin.bounded_exit import is_cli_run_local

    assert is_cli_run_local(argv) is expected


def test_a_run_local_called_in_process_with_its_output_redirected_arms_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's MCP server runs the CLI command's callback in process with stdout/stderr redirected to
    StringIO: the stack dump and exit watchdog are for the CLI process only, and never fail a run
    (faulthandler needs a real descriptor). The run fails here on its own (an unknown model), as
    MLflow's error; the process (this test's) is not ended 30 s later by a watchdog."""
    import contextlib
    import faulthandler
    import io

    from mlflow.deployments import cli as deployments_cli
    from mlflow.exceptions import MlflowException

    armed: list[str] = []
    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda *a, **k: armed.append("watchdog"))
    monkeypatch.setattr(faulthandler, "register", lambda *a, **k: armed.append("sigusr1"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DEPLOY_HOME", str(tmp_path / "home"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(MlflowException):
        deployments_cli.run_local.callback(target="lifecycle", name="in-process", model_uri="models:/nope/1",
                                           flavor=None, config=())
    assert armed == []
