"""The MLServer side of ``benchmarks/serving.py``: its virtualenv, its model repository, its V2 bodies.

MLServer 1.7.1 is a peer the benchmark measures beside `mlflow models serve` and ours, on the same
registered model, in the same cells:

- ``mlserver``: plain (one request, one predict call);
- ``mlserver-batch``: adaptive batching, ``max_batch_size`` 32 and ``max_batch_time`` 0.002 s in
  ``model-settings.json`` (requests arriving within 2 ms are predicted as one batch).

Its own virtualenv. MLServer needs things our venv must not get (FastAPI < 0.116; uvloop < 0.22,
see ``UVLOOP``), so the benchmark makes ``~/.cache/mlflow-deploy-plugin/bench/mlserver-1.7.1/``
once, with the same Python, and installs there MLServer, its MLflow runtime and the MLflow,
scikit-learn, NumPy and pandas versions of the benchmark's own venv (the model is a serialized
scikit-learn estimator, ``model.skops`` today: the same versions load it the same way). A later run reuses it when its pins still match (``.bench-pins`` in the venv).

The model: the MLflow runtime (``mlserver_mlflow.MLflowRuntime``) on the registered model's own
folder, downloaded from the run's artifact store before MLServer is launched: it loads it with
``mlflow.pyfunc.load_model``, the way the two other servers do, and takes its input columns from
the model's signature (one V2 input tensor per column, decoded to a DataFrame by MLServer's pandas
codec). The load generator sends such V2 bodies (``v2_body``) to ``/v2/models/<name>/infer``,
with the same rows as the ``dataframe_split`` bodies the others get on ``/invocations``.

Comparable to the others (one worker each):

- ``parallel_workers`` = the benchmark's ``--workers`` (1 by default): MLServer's own notion of a
  worker, and its default shape. The model runs in one inference process, as in `mlflow models
  serve -w 1` and our one worker; MLServer's HTTP front (the parent process, where adaptive
  batching groups the requests before it hands them to the worker) is part of that shape, as our
  supervisor is part of ours, and its CPU and memory are counted with the rest of the process
  group. ``parallel_workers: 0`` (inference in the front's event loop) is not MLServer's default
  and would leave adaptive batching with a blocking predict in the loop that should batch.
- ``debug: false``: no access log (uvicorn's ``access_log`` follows MLServer's ``debug``), as for
  ours (never) and `mlflow models serve` (``UVICORN_ACCESS_LOG=false``, see serving.py).
- Metrics stay on (MLServer's default, as ours), on a port of their own; gRPC listens too (it
  cannot be turned off) on a free port, idle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VERSION = "1.7.1"
MODEL = "bench-logreg"  # the V2 model name (the registered model's name)
BATCH_SIZE = 32
BATCH_TIME_S = 0.002
INSTALL_TIMEOUT_S = 1800.0
# MLServer's inference workers call asyncio.get_event_loop() before a loop is set, which uvloop
# 0.22 made an error ("There is no current event loop"): the worker dies and MLServer stops.
UVLOOP = "uvloop<0.22"


def default_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mlflow-deploy-plugin" / "bench" / f"mlserver-{VERSION}"


def pins() -> list[str]:
    """What the MLServer venv needs: MLServer and its MLflow runtime, with the MLflow, scikit-learn
    and NumPy of this venv (the model was serialized by them) and its pandas (the runtime builds a
    DataFrame per request, as the other servers do: the same pandas keeps that cost the same)."""
    import mlflow
    import numpy
    import pandas
    import sklearn

    return [f"mlserver=={VERSION}", f"mlserver-mlflow=={VERSION}", f"mlflow=={mlflow.__version__}",
            f"scikit-learn=={sklearn.__version__}", f"numpy=={numpy.__version__}", f"pandas=={pandas.__version__}",
            UVLOOP]


def ensure_venv(venv: Path, requirements: list[str]) -> Path:
    """The ``mlserver`` executable of ``venv``, after making the venv and installing ``requirements``
    into it if it is missing or was made with other pins. Says on stderr which it was."""
    marker = venv / ".bench-pins"
    wanted = "\n".join(requirements) + "\n"
    exe = venv / "bin" / "mlserver"
    if exe.exists() and marker.exists() and marker.read_text() == wanted:
        print(f"  MLServer: reusing the virtualenv {venv}", file=sys.stderr)
        return exe
    t0 = time.monotonic()
    if not (venv / "bin" / "python").exists():
        print(f"  MLServer: creating the virtualenv {venv} ({sys.executable}, Python "
              f"{sys.version.split()[0]}) ...", file=sys.stderr)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    print(f"  MLServer: installing {' '.join(requirements)} into it (once; may take minutes) ...", file=sys.stderr)
    log = venv / "pip-install.log"
    with open(log, "wb") as out:
        done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                               *requirements], stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0 or not exe.exists():
        marker.unlink(missing_ok=True)
        raise RuntimeError(f"installing MLServer into {venv} failed (exit {done.returncode}): "
                           f"{log.read_text(errors='replace')[-3000:]}")
    marker.write_text(wanted)
    print(f"  MLServer: installed in {time.monotonic() - t0:.0f} s (log {log})", file=sys.stderr)
    return exe


def v2_body(columns: list[str], data: list[list[float]]) -> str:
    """A V2 inference request for MLflow's runtime: one FP64 tensor of shape [rows, 1] per column
    (the model's signature is column-based, so MLServer decodes the inputs into a DataFrame)."""
    return json.dumps({"inputs": [{"name": name, "shape": [len(data), 1], "datatype": "FP64",
                                   "data": [row[i] for row in data]} for i, name in enumerate(columns)]})


def v2_predictions(answer: dict[str, Any]) -> list[Any]:
    """The predictions of a V2 response (its one output, flattened): comparable with the
    ``predictions`` list of `/invocations`."""
    outputs = answer.get("outputs") or []
    if len(outputs) != 1:
        raise ValueError(f"expected one output, got {[o.get('name') for o in outputs]}")
    return list(outputs[0]["data"])


def write_repository(folder: Path, model_dir: Path, *, port: int, grpc_port: int, metrics_port: int,
                     workers: int, batching: bool) -> Path:
    """A model repository for ``mlserver start``: server ``settings.json`` and the model's
    ``model-settings.json`` (MLflow runtime on ``model_dir``, adaptive batching or not)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"debug": False, "host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port,
                "metrics_port": metrics_port, "parallel_workers": workers, "load_models_at_startup": True}
    model: dict[str, Any] = {"name": MODEL, "implementation": "mlserver_mlflow.MLflowRuntime",
                             "parameters": {"uri": str(model_dir)}}
    if batching:
        model.update(max_batch_size=BATCH_SIZE, max_batch_time=BATCH_TIME_S)
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    (folder / "model-settings.json").write_text(json.dumps(model, indent=2))
    return folder


def command(exe: Path, folder: Path) -> list[str]:
    return [str(exe), "start", str(folder)]


def paths() -> dict[str, str]:
    """Where the load generator posts and where the cold start polls (ready = model loaded)."""
    return {"path": f"/v2/models/{MODEL}/infer", "ready_path": f"/v2/models/{MODEL}/ready"}
