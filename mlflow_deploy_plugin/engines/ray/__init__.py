"""The Ray Serve engine (``lifecycle:/ray``): each deployment is one Serve application.

- ``engine.py``: :class:`RayEngine`, the engine contract on the CLI side (connect, deploy,
  read the cluster's own state);
- ``ingress.py``: the Serve deployment class; each replica serves the same ASGI app as a local
  worker (``serving/app.py``), so the protocol, routes and capture are the same;
- ``agent_host.py``: a detached Ray actor that keeps the deployment's background agent running;
- ``shutdown.py``: how long Serve lets a retiring replica answer what it holds and flush;
- ``replica_deaths.py``: which dead replicas crashed (``restarts``) and which Serve retired.

Everything here needs the ``[ray]`` extra (``ray[serve]``); ``RayEngine`` is imported on first use
so that ``engines/base.py`` can say so when it is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow_deploy_plugin.engines.ray.engine import RayEngine

__all__ = ["RayEngine"]


def __getattr__(name: str) -> Any:
    if name == "RayEngine":
        from mlflow_deploy_plugin.engines.ray.engine import RayEngine

        return RayEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
