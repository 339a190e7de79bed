"""MLflow's own scoring server for several models in one process: the app `mlflow models serve` runs
(``mlflow.pyfunc.scoring_server.init`` of the model, under uvicorn with its defaults), one uvicorn
server per model, each on a port of its own.

`mlflow models serve` costs two interpreters per model (its CLI, then the `uvicorn
mlflow.pyfunc.scoring_server.app:app` it execs), each importing MLflow. tests/test_compat_mlflow_serve.py
compares several model kinds side by side with MLflow's server: their peers run here, in one
interpreter, with the same app and the same HTTP server; its breast-cancer peer stays a real
`mlflow models serve`.

Usage: python tests/mlflow_scoring_peers.py PORT=MODEL_URI [PORT=MODEL_URI ...]
Stopped by SIGTERM (each server shuts down gracefully, as uvicorn does) or SIGKILL.
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn
from mlflow.pyfunc import scoring_server
from mlflow.tracking.artifact_utils import _download_artifact_from_uri


def main(pairs: list[str]) -> None:
    servers = []
    for pair in pairs:
        port, _, model_uri = pair.partition("=")
        # What `mlflow models serve` does: download the model, then serve the local copy.
        local_path = _download_artifact_from_uri(model_uri)
        app = scoring_server.init(scoring_server.load_model_with_mlflow_config(local_path))
        servers.append(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(port))))

    async def serve_all() -> None:
        # Each server's signal handler hands a SIGTERM on to the one installed before it once it has
        # shut down (uvicorn re-raises the signals it captured), so one SIGTERM stops them all.
        await asyncio.gather(*(server.serve() for server in servers))

    asyncio.run(serve_all())


if __name__ == "__main__":
    main(sys.argv[1:])
