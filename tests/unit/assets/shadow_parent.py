"""A stand-in for a serving worker: starts a ShadowProcess as a worker does, says its child's pid,
then waits until the test kills it (``kill -9``, as the OOM killer would a worker).

Arguments: the deployment spec (a JSON file), the shadow's model folder, a folder for capture, and
optionally the liveness folder a worker keeps its child's capture counts in (``tally_dir``). The
ShadowProcess is built on a thread that ends at once (as a loading thread may), and the child must
outlive that thread: only the death of this process ends it.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from mlflow_deploy_plugin.engines.local.shadow_process import ShadowProcess
from mlflow_deploy_plugin.spec import DeploymentSpec


def main() -> int:
    spec = DeploymentSpec.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    model_dir, folder = Path(sys.argv[2]), Path(sys.argv[3])
    tally_dir = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    built: list[ShadowProcess] = []

    def build() -> None:
        built.append(ShadowProcess(spec, model_dir, str(folder / "capture"), folder / "capture.key", "own",
                                   lambda reason, count: None, lambda outcome, seconds, count: None, lambda rows: None,
                                   tally_dir=tally_dir))

    thread = threading.Thread(target=build, name="loader")
    thread.start()
    thread.join()
    shadow = built[0]
    shadow.wait_ready()
    print(shadow.pid, flush=True)
    sys.stdin.read()  # until killed (or the test closes our stdin)
    shadow.close(timeout_s=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
