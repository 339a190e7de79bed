"""What a serving worker does on its way to its first answer (the cold start's critical path).

A real worker start (``serving.worker._prepare``: imports, model load, smoke test, capture writer,
app) in a fresh interpreter, on the iris classifier with capture on (the default):

- the modules it holds: reading capture back (``pyarrow.dataset``) and Parquet files are jobs of
  other processes, and the shadow process's modules are for deployments with a shadow version: the
  worker must not pay for their imports before it can answer;
- its cyclic GC: off while it imports (as the worker module run as a program starts), then on again
  with what the imports made frozen out of later collections, and never a full pass over them (one
  costs ~0.25 s of CPU on the way to the first answer).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef, spec_to_json

_START = """
import gc, json, sys
from pathlib import Path
if sys.argv[2] == "gc-off":
    gc.disable()  # what the worker module does first when run as a program
# Full collections that walk objects nothing froze yet: after the imports, each walks ~430k of them.
unfrozen_full_passes = []
def count(phase, info):
    if phase == "start" and info["generation"] == 2 and gc.get_freeze_count() == 0:
        unfrozen_full_passes.append(len(gc.get_objects()))
gc.callbacks.append(count)
from mlflow_deploy_plugin.serving import worker
spec_file = Path(sys.argv[1])
server, capture = worker._prepare(worker.WorkerSpec.read(spec_file), fd=-1, ready_fd=-1)
assert capture is not None, "capture is on by default"
capture.close(timeout_s=5.0)
gc.callbacks.remove(count)
print(json.dumps({"modules": sorted(sys.modules), "gc_on": gc.isenabled(), "frozen": gc.get_freeze_count(),
                  "unfrozen_full_passes": unfrozen_full_passes}))
"""


def _start(tmp_path: Path, classifier_path: Path, gc_mode: str) -> dict[str, Any]:
    models = tmp_path / "models"
    shutil.copytree(classifier_path, models / "iris" / "1")  # the local copy `create` makes
    spec = DeploymentSpec("unit-imports", ModelRef("models:/iris/1", "iris", "1"), DeploymentConfig())
    spec_file = tmp_path / "generation-1.json"
    spec_file.write_text(json.dumps(spec_to_json(spec, models_dir=str(models), capture_dir=str(tmp_path / "capture"))))
    out = subprocess.run([sys.executable, "-c", _START, str(spec_file), gc_mode], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    started: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return started


def test_a_started_worker_holds_no_capture_reader_nor_parquet(tmp_path: Path, classifier_path: Path) -> None:
    loaded = set(_start(tmp_path, classifier_path, "gc-on")["modules"])
    assert "mlflow.pyfunc" in loaded and "mlflow_deploy_plugin.capture.writer" in loaded  # it did start
    held = sorted(loaded & {"pyarrow.dataset", "pyarrow.parquet", "mlflow_deploy_plugin.capture.reader",
                            "mlflow_deploy_plugin.capture.columns",
                            # a deployment without a shadow version starts no shadow process
                            "mlflow_deploy_plugin.engines.local.shadow_process",
                            "mlflow_deploy_plugin.serving.shadow", "mlflow_deploy_plugin.serving.shadow_channel"})
    assert held == [], f"a starting worker imports {held}"


def test_the_worker_run_as_a_program_imports_with_the_gc_off_and_loads_with_it_on(
        tmp_path: Path, classifier_path: Path) -> None:
    # Run as a program, the module turns the GC off before its own imports (here it stops at the
    # missing arguments, before main does anything).
    code = ("import gc, runpy, sys\n"
            "sys.argv = ['worker']\n"
            "try:\n    runpy.run_module('mlflow_deploy_plugin.serving.worker', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('gc on' if gc.isenabled() else 'gc off')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.stdout.strip().splitlines()[-1] == "gc off", out.stderr[-2000:]

    started = _start(tmp_path, classifier_path, "gc-off")
    # On again after the imports, for the model's load and for serving, with what the imports made
    # (MLflow, scikit-learn, SciPy, ...: hundreds of thousands of objects) frozen out of its passes.
    assert started["gc_on"] is True
    assert started["frozen"] > 100_000, started["frozen"]
    # Frozen as they are, garbage and all: no full pass over them on the way to the first answer.
    assert started["unfrozen_full_passes"] == [], started["unfrozen_full_passes"]
    # A worker that never turned it off (a test calling _prepare) is left as it was: nothing frozen.
    assert _start(tmp_path / "again", classifier_path, "gc-on")["frozen"] == 0
