"""The background agent of one deployment: what runs beside the service, on its own schedule.

Started (and restarted if it dies) by the deployment's supervisor when the deployment needs it:
today for scheduled drift reports (``-C drift_schedule``). It imports MLflow and Evidently, so
it lives in its own process: the supervisor stays small and the workers never pause for it.

Run as ``python -m mlflow_deploy_plugin.agent DEPLOYMENT_DIR``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.state import StateStore

_logger = logging.getLogger("mlflow_deploy_plugin.agent")


def needs_agent(spec: dict[str, Any]) -> bool:
    """Whether a deployment with this spec has background work to do."""
    return bool((spec.get("config") or {}).get("drift_schedule"))


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m mlflow_deploy_plugin.agent DEPLOYMENT_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [agent %(process)d] %(name)s: %(message)s")
    root = Path(args[0]).resolve()
    store = StateStore(root.parent.parent)
    name = root.name
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = os.getppid()

    def watch_parent() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                _logger.warning("Supervisor is gone; stopping.")
                stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    from mlflow_deploy_plugin.monitoring.schedule import DriftScheduler

    _logger.info("Agent of %s started", name)
    DriftScheduler(store, [name]).run_forever(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
