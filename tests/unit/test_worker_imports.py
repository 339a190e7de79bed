"""What a serving worker imports on its way to its first answer (the cold start's critical path).

A real worker start (``serving.worker._prepare``: imports, model load, smoke test, capture writer,
app) in a fresh interpreter, on the iris classifier with capture on (the default), then the modules
it holds. Reading capture back (``pyarrow.dataset``) and Parquet files are jobs of other processes:
the worker must not pay for their imports before it can answer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow_deploy_plugin.spec import DeploymentConfig, DeploymentSpec, ModelRef, spec_to_json

_START = """
import json, sys
from pathlib import Path
from mlflow_deploy_plugin.serving import worker
spec_file = Path(sys.argv[1])
server, capture = worker._prepare(worker.WorkerSpec.read(spec_file), fd=-1, ready_fd=-1)
assert capture is not None, "capture is on by default"
capture.close(timeout_s=5.0)
print(json.dumps(sorted(sys.modules)))
"""


def test_a_started_worker_holds_no_capture_reader_nor_parquet(tmp_path: Path, classifier_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(classifier_path, models / "iris" / "1")  # the local copy `create` makes
    spec = DeploymentSpec("unit-imports", ModelRef("models:/iris/1", "iris", "1"), DeploymentConfig())
    spec_file = tmp_path / "generation-1.json"
    spec_file.write_text(json.dumps(spec_to_json(spec, models_dir=str(models), capture_dir=str(tmp_path / "capture"))))
    out = subprocess.run([sys.executable, "-c", _START, str(spec_file)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "mlflow.pyfunc" in loaded and "mlflow_deploy_plugin.capture.writer" in loaded  # it did start
    held = sorted(loaded & {"pyarrow.dataset", "pyarrow.parquet", "mlflow_deploy_plugin.capture.reader",
                            "mlflow_deploy_plugin.capture.columns"})
    assert held == [], f"a starting worker imports {held}"
