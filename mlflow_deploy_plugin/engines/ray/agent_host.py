"""A detached Ray actor that keeps one deployment's background agent running.

The agent (``mlflow_deploy_plugin.agent``: follow the registry, scheduled drift, policies) is the
same program the local supervisor runs; here a small detached actor plays the supervisor's part:
it starts the agent as a child process, restarts it if it exits, and Ray restarts the actor
itself if it dies (``max_restarts=-1``), so nothing depends on the CLI call that ran ``create``.
The agent watches its parent: when the actor goes (``ray.kill`` on delete), the agent stops.
The actor also watches the deployment's replicas (``replica_faults.py``): a replica that crashed
and the deployment serving in full again are written to the history, as the local supervisor
writes a worker's (``crashed``, ``worker_recovered``), so ``-C notify`` receivers hear of them.

The agent is a child process, not code imported here, for the same reason as under the local
supervisor: it imports MLflow and Evidently and drives the deployment core, which sits above the
engines (``lifecycle -> deployments -> engines``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import ray

from mlflow_deploy_plugin.engines.base import EngineStatus

AGENT_MODULE = "mlflow_deploy_plugin.agent"
RESTART_DELAY_S = 5.0


@ray.remote(num_cpus=0, max_restarts=-1)
class AgentHost:
    """Runs ``python -m mlflow_deploy_plugin.agent <deployment folder>`` and restarts it if it exits."""

    def __init__(self, root: str, env: dict[str, str],
                 read_status: Callable[[str, str], EngineStatus] | None = None) -> None:
        """``read_status(home, name)``: the deployment's status (the engine's ``read_status``, handed
        over by the engine that starts this actor: importing the engine here would be an import circle)."""
        self.root = Path(root)
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.restarts = 0
        self._start()
        threading.Thread(target=self._watch, daemon=True).start()
        if read_status is not None:
            threading.Thread(target=self._watch_replicas, args=(env, read_status), name="replica-watch",
                             daemon=True).start()

    def _watch_replicas(self, env: dict[str, str], read_status: Callable[[str, str], EngineStatus]) -> None:
        from mlflow_deploy_plugin.engines.ray.replica_faults import watch_replicas
        from mlflow_deploy_plugin.state import StateStore

        if env.get("RAY_ADDRESS"):  # the engine names the cluster this actor runs on (it is joined already)
            os.environ.setdefault("RAY_ADDRESS", env["RAY_ADDRESS"])
        home, name = self.root.parent.parent, self.root.name
        store = StateStore(home)
        watch_replicas(lambda: read_status(str(home), name),
                       lambda event, **details: store.append_history(name, event, **details), self.stopping)

    def _start(self) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "agent.log", "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", AGENT_MODULE, str(self.root)], env=self.env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            if self.process is not None and self.process.poll() is not None:
                if self.stopping.wait(RESTART_DELAY_S):  # a crash loop must not spin
                    return
                self.restarts += 1
                self._start()

    def pid(self) -> int | None:
        """The agent process's pid while it runs."""
        if self.process is not None and self.process.poll() is None:
            return self.process.pid
        return None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the agent gracefully (SIGTERM: it finishes its cycle), forcefully after ``timeout_s``."""
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
