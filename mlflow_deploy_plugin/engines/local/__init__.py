"""The local engine: each deployment is a detached supervisor process with uvicorn workers.

- ``engine.py``: :class:`LocalEngine`, the engine contract on the CLI side;
- ``supervisor.py``: the long-lived process that owns the port and the workers (stdlib only);
- ``mailbox.py``: CLI -> supervisor requests as files;
- ``worker_protocol.py``: what a worker and its supervisor say to each other.
The worker process itself is ``serving/worker.py``: it is the serving app under uvicorn.
"""

from mlflow_deploy_plugin.engines.local.engine import LocalEngine

__all__ = ["LocalEngine"]
