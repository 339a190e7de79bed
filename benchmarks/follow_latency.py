"""Follow-latency benchmark: how fast a registry change reaches the deployments that follow it.

Self-contained. It makes a throw-away folder (a real `mlflow server` on SQLite with webhooks
enabled, artifacts and $MLFLOW_DEPLOY_HOME), registers two versions of the example model, starts
`mlflow-deploy watch` (the webhook receiver) and two deployments through the real CLI:

- ``by-alias`` of ``models:/<model>@champion`` polling every 300 s, so only the webhook moves it;
- ``by-stage`` of ``models:/<model>-staged/Production`` (the same logged models, registered under
  a second name) polling every ``--poll`` s: stage transitions fire no webhook.

Then, ``--repeat`` times, it moves the alias and the stage to the other version the way the UI does
(one REST call each) and measures, to the millisecond:

- webhook delivery: alias move -> a receiver (the app `watch` runs, here in-process) accepted the
  signed delivery;
- alias follow: alias move -> the deployment answers with the new version (webhook path);
- stage follow: stage transition -> the deployment answers with the new version (polling path).

    .venv/bin/python benchmarks/follow_latency.py [--repeat 3] [--poll 2]

The first rounds include the deployments fetching and loading a version they have not served
yet; later rounds move between cached versions. The targets printed next to the medians are what
the end-to-end tests used to assert (alias <= 2 s, stage <= poll + 1.5 s, delivery < 2 s); the
tests now only check that the follow happens. Traffic goes to 127.0.0.1 only, every wait is
bounded, and everything started is stopped on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "follow-bench"
STAGED = "follow-bench-staged"
SECRET = "follow-latency-benchmark-secret"
WAIT_S = 120.0  # bound of every wait: a follow slower than this is a failure, not a figure


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _post_json(url: str, payload: dict) -> None:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")


def _until(predicate: Callable[[], bool], what: str, started: float) -> float:
    """Seconds from ``started`` (monotonic) until ``predicate`` holds; polled every 5 ms."""
    deadline = started + WAIT_S
    while time.monotonic() < deadline:
        try:
            if predicate():
                return time.monotonic() - started
        except OSError:
            pass  # not up yet
        time.sleep(0.005)
    raise TimeoutError(f"{what} did not happen within {WAIT_S:.0f}s")


class Processes:
    """Everything this benchmark starts, stopped in reverse order (each in its own process group)."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, subprocess.Popen]] = []
        self.deployments: list[str] = []
        self.env: dict[str, str] = {}

    def start(self, name: str, argv: list[str], log: Path, **popen: object) -> subprocess.Popen:
        with open(log, "wb") as handle:
            proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                    **popen)
        self.groups.append((name, proc))
        return proc

    def stop(self) -> None:
        for name in reversed(self.deployments):
            subprocess.run([str(BIN / "mlflow"), "deployments", "delete", "-t", "lifecycle", "--name", name],
                           env=self.env, capture_output=True, timeout=120, check=False)
        self.deployments.clear()
        for _, proc in reversed(self.groups):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # and whatever it started
            proc.wait(15)
        self.groups.clear()


def _wait_http(url: str, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2).close()
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not up after {WAIT_S:.0f}s")


class Probe:
    """An in-process webhook receiver (the one `watch` runs) noting when each alias move arrives."""

    def __init__(self) -> None:
        import threading

        import uvicorn

        from mlflow_deploy_plugin.lifecycle.webhooks import build_receiver_app

        self.arrivals: dict[str, float] = {}  # version the alias moved to -> monotonic arrival time
        self.port = _free_port()
        app = build_receiver_app(SECRET, self._on_event)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def _on_event(self, event) -> None:
        if event.event == "model_version_alias.created" and event.model_name == MODEL:
            self.arrivals[str(event.version)] = time.monotonic()

    def __enter__(self) -> Probe:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the probe receiver did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def run(repeat: int, poll_s: float, processes: Processes, workdir: Path,
        probe: Probe) -> dict[str, list[float]]:
    from cryptography.fernet import Fernet

    port = _free_port()
    server_url = f"http://127.0.0.1:{port}"
    server_env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                  "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                  "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server_env.pop("MLFLOW_TRACKING_URI", None)
    log = workdir / "mlflow-server.log"
    server = processes.start("mlflow server", [
        str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
        "--default-artifact-root", str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1"], log, env=server_env, cwd=workdir)
    _wait_http(f"{server_url}/health", "mlflow server", server, log)
    print(f"mlflow server up at {server_url}", file=sys.stderr)

    env = {**os.environ, "MLFLOW_TRACKING_URI": server_url,
           "MLFLOW_DEPLOY_HOME": str(workdir / "deploy-home"), "MLFLOW_DEPLOY_WEBHOOK_SECRET": SECRET,
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_DEPLOY_HOME")})
    processes.env = env
    import mlflow

    from mlflow_deploy_plugin.lifecycle.webhooks import register_webhook

    watch_port = _free_port()
    client = mlflow.MlflowClient(tracking_uri=server_url, registry_uri=server_url)
    # Before any registry event fires: the server caches each event's webhook list for 60 s.
    register_webhook(f"http://127.0.0.1:{watch_port}/webhooks/mlflow", SECRET, client=client)
    register_webhook(f"http://127.0.0.1:{probe.port}/webhooks/mlflow", SECRET, name="follow-bench-probe",
                     client=client)
    sys.path.insert(0, str(REPO / "examples"))
    from train import train

    mlflow.set_tracking_uri(server_url)
    with contextlib.redirect_stdout(sys.stderr):
        train(MODEL, c=1.0, alias="champion", experiment="follow-bench")
        train(MODEL, c=0.1, experiment="follow-bench")
    # The stage deployment serves the same logged models under another name: the webhooks that the
    # alias deployment's switches fire (tags on MODEL's versions) never poke it, so it moves by polling.
    for version in ("1", "2"):
        mlflow.register_model(client.get_model_version(MODEL, version).source, STAGED)
    _post_json(f"{server_url}/ajax-api/2.0/mlflow/model-versions/transition-stage",
               {"name": STAGED, "version": "1", "stage": "Production", "archive_existing_versions": True})

    log = workdir / "watch.log"
    watcher = processes.start("mlflow-deploy watch",
                              [str(BIN / "mlflow-deploy"), "watch", "--port", str(watch_port)],
                              log, env=env, cwd=workdir)
    _wait_http(f"http://127.0.0.1:{watch_port}/health", "mlflow-deploy watch", watcher, log)
    urls = {}
    for name, uri, poll in (("by-alias", f"models:/{MODEL}@champion", 300.0),
                            ("by-stage", f"models:/{STAGED}/Production", poll_s)):
        processes.deployments.append(name)
        subprocess.run([str(BIN / "mlflow"), "deployments", "create", "-t", "lifecycle", "--name", name,
                        "-m", uri, "-C", f"poll_interval_s={poll:g}"],
                       env=env, cwd=workdir, check=True, capture_output=True, timeout=300)
        status = workdir / "deploy-home/deployments" / name / "status.json"
        urls[name] = json.loads(status.read_text())["url"]
    print(f"watcher and deployments up ({', '.join(f'{k} {v}' for k, v in urls.items())})", file=sys.stderr)

    def serving(name: str) -> str:
        return _get_json(f"{urls[name]}/deployment")["model_version"]

    stage = f"stage follow (poll {poll_s:g} s)"
    figures: dict[str, list[float]] = {"webhook delivery": [], "alias follow (webhook)": [], stage: []}
    for attempt in range(repeat):
        target = "2" if attempt % 2 == 0 else "1"
        probe.arrivals.pop(target, None)
        moved = time.monotonic()
        _post_json(f"{server_url}/api/2.0/mlflow/registered-models/alias",
                   {"name": MODEL, "alias": "champion", "version": target})
        figures["alias follow (webhook)"].append(_until(lambda t=target: serving("by-alias") == t,
                                                        "the alias deployment to switch", moved))
        _until(lambda t=target: t in probe.arrivals, "the webhook delivery to the probe", moved)
        figures["webhook delivery"].append(probe.arrivals[target] - moved)
        moved = time.monotonic()
        _post_json(f"{server_url}/ajax-api/2.0/mlflow/model-versions/transition-stage",
                   {"name": STAGED, "version": target, "stage": "Production",
                    "archive_existing_versions": True})
        figures[stage].append(_until(lambda t=target: serving("by-stage") == t,
                                     "the stage deployment to switch", moved))
        summary = ", ".join(f"{k} {v[-1]:.3f} s" for k, v in figures.items())
        print(f"  round {attempt + 1}/{repeat}: {summary}", file=sys.stderr)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3,
                        help="moves of the alias and of the stage (default 3)")
    parser.add_argument("--poll", type=float, default=2.0, help="poll interval of the stage deployment, s")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-follow-bench-"))
    processes = Processes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    previous_cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with Probe() as probe:
            figures = run(args.repeat, args.poll, processes, workdir, probe)
    finally:
        processes.stop()
        os.chdir(previous_cwd)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    targets = {"webhook delivery": 2.0, "alias follow (webhook)": 2.0,
               f"stage follow (poll {args.poll:g} s)": args.poll + 1.5}
    print(f"\n{'registry change -> reached':<32} {'median':>8} {'max':>8} {'target':>8}")
    for what, values in figures.items():
        if not values:
            print(f"{what:<32} {'n/a':>8}")
            continue
        median, worst = statistics.median(values), max(values)
        verdict = "ok" if worst <= targets[what] else "SLOW"
        print(f"{what:<32} {median:7.3f}s {worst:7.3f}s {targets[what]:7.1f}s  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
