"""The local engine: each deployment is a detached supervisor process with uvicorn workers.

- ``engine.py``: :class:`LocalEngine`, the engine contract on the CLI side;
- ``supervisor.py``: the long-lived process that owns the port and the workers (stdlib only);
- ``mailbox.py``: CLI -> supervisor requests as files;
- ``worker_protocol.py``: what a worker and its supervisor say to each other.
The worker process itself is ``serving/worker.py``: it is the serving app under uvicorn.

``LocalEngine`` is imported on first use, so the supervisor and the workers, which import this
package for its protocol modules, do not load the CLI-side engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow_deploy_plugin.engines.local.engine import LocalEngine

__all__ = ["LocalEngine"]


def __getattr__(name: str) -> Any:
    if name == "LocalEngine":
        from mlflow_deploy_plugin.engines.local.engine import LocalEngine

        return LocalEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
