"""A stand-in for a serving worker with a shadow child, as the supervisor sees it after a ``kill -9``.

Argument: the liveness folder (``run/live``). It writes its liveness file with its own capture
counts (accepted 3, settled 1) and ``<pid>.shadow`` with its shadow child's (accepted 9, settled 4)
and the child's pid, as ``ShadowProcess`` does, then says the child's pid and waits until the test
kills it. The child is a real shadow process (``python -m ...shadow_process``) waiting for its start
message: it dies with this process (``PR_SET_PDEATHSIG``), as a loaded one does (its pid is said once
it has read the first byte of a message: past its ``prctl``, blocked for the rest). The counts are
stored here through the same shared memory map the child's capture writer uses (loading a model
and catching its writer with unspooled rows is ``tests/unit/test_shadow_process.py``'s business).
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import subprocess
import sys
import termios
import time
from pathlib import Path

from mlflow_deploy_plugin.engines.local.liveness import (
    SHADOW_COUNTS_SIZE,
    LivenessWriter,
    ShadowTallyFile,
    shadow_tally_path,
)


def main() -> int:
    live_dir = Path(sys.argv[1])
    own = LivenessWriter(live_dir / str(os.getpid())).capture_tally()
    own[0], own[1] = 3, 1
    tally = ShadowTallyFile(shadow_tally_path(live_dir, os.getpid()))
    to_child, to_child_w = os.pipe()
    from_child_r, from_child = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-m", "mlflow_deploy_plugin.engines.local.shadow_process", "--in-fd", str(to_child),
         "--out-fd", str(from_child), "--parent-pid", str(os.getpid()), "--tally-fd", str(tally.fd)],
        pass_fds=(to_child, from_child, tally.fd), stdin=subprocess.DEVNULL)
    tally.started(child.pid)
    counts = memoryview(mmap.mmap(tally.fd, SHADOW_COUNTS_SIZE)).cast("q")
    counts[0], counts[1] = 9, 4
    os.write(to_child_w, b"\0")  # the first byte of a length prefix: the child reads it, then waits
    unread = array.array("i", [1])
    deadline = time.monotonic() + 120
    while unread[0] and time.monotonic() < deadline and child.poll() is None:
        fcntl.ioctl(to_child_w, termios.FIONREAD, unread)  # bytes still in the pipe
        time.sleep(0.01)
    print(child.pid if not unread[0] else f"the child read nothing (exit {child.poll()})", flush=True)
    sys.stdin.read()  # until killed
    return 0


if __name__ == "__main__":
    sys.exit(main())
