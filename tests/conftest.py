"""Shared, real set-up: one MLflow tracking store with registered example models, one deployment
reused by the tests that only read from it, and helpers to run the real `mlflow deployments` CLI.

The store is a SQLite file in a temp folder. With ``--store postgresql`` every store (the session's,
each `mlflow server`'s, each module's own) is instead a fresh database on a throwaway PostgreSQL server
the session starts (tests/pg_server.py); `make test` runs the tests marked ``store`` that way too.
MLFLOW_TEST_TRACKING_URI (e.g. a PostgreSQL URI) points the session store at an existing server.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests
from pg_server import INSTALL_HINT, PostgresServer, find_bindir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from train import PIP_REQUIREMENTS, load_data, train  # noqa: E402

MODEL = "breast_cancer"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Bound for a version switch by the agent (follow, promote, roll back): seconds on an idle machine,
# but a new worker imports MLflow and loads the model, which takes a minute on two busy cores.
SWITCH_S = 150


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # the thing polled may not exist yet
            last = exc
        else:
            if last:
                return last
        time.sleep(interval_s)
    raise AssertionError(f"Timed out after {timeout_s}s waiting for {what} (last: {last!r})")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test that ran deployments shows the tail of every deployment log written during it
    (supervisor, workers, agent): on CI that is the only trace of what the processes saw."""
    report = yield
    env = getattr(item, "funcargs", {}).get("env")
    if report.failed and call.when == "call" and env is not None:
        home = Path(env.home)
        for log in sorted([*home.glob("deployments/*/logs/*.log"), *home.glob("archive/*/logs/*.log")]):
            try:
                if log.stat().st_mtime < call.start:
                    continue
                tail = log.read_text(errors="replace").splitlines()[-60:]
            except OSError:
                continue
            report.sections.append((f"deployment log {log.relative_to(home)}", "\n".join(tail)))
    return report


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store", choices=("sqlite", "postgresql"), default=os.environ.get("MLFLOW_TEST_STORE", "sqlite"),
                     help="backend of the MLflow stores the tests create (default: sqlite; "
                          "postgresql starts a throwaway server, skipped without its binaries unless CI=true)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "store: depends on the MLflow tracking/registry backend; "
                                       "`make test` runs these again with --store postgresql")


# Work units xdist hands out first, longest first (measured: `make test` prints the slowest
# tests): a long unit started last would leave the other worker idle at the end of the run.
LONGEST_FIRST = ("ray", "tests/test_lifecycle_e2e.py", "tests/test_stage_world_e2e.py",
                 "tests/test_promotion_steps_e2e.py", "tests/test_quality_e2e.py", "tests/test_capture_drift_e2e.py",
                 "tests/test_shadow_e2e.py", "tests/test_drift_volume_e2e.py", "tests/test_self_healing.py",
                 "tests/test_compat_mlflow_serve.py",
                 "tests/test_v2_clients.py",
                 "tests/test_update_and_supervision.py", "tests/test_hostile_http.py", "tests/test_cli_verbs.py",
                 "tests/test_notify_e2e.py",
                 # The few long tests among the in-process ones (each starts processes or a store): the
                 # many short ones after them even out the two workers' ends; one of these handed out
                 # among the last would leave the other worker idle (busy pair: 104 s, 62 s, 26 s, 21 s).
                 "tests/unit/test_shadow_process.py", "tests/unit/test_cbpe.py",
                 "tests/unit/test_engine_selection.py", "tests/unit/test_import_graph.py")


# tryfirst: xdist's own hook turns the group markers into node ids; run after it, they would be
# ignored (every test its own unit: module fixtures and the Ray cluster built on both workers).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup --no-loadscope-reorder`), keep the
    tests of a file that share a module fixture (a tracking server, a deployment) on one worker so it
    is built once, every Ray test on one worker so the session starts one Ray cluster, and let every
    other test go to whichever worker is free; then order the units longest first."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        path = item.nodeid.split("::", 1)[0]
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        shares_module_fixture = any(d.scope == "module" for fixture in defs.values() for d in fixture)
        if "ray_cluster" in getattr(item, "fixturenames", ()) or "lifecycle:/ray" in item.nodeid:
            group = "ray"
        else:
            group = path if shares_module_fixture else None  # no mark: a unit of its own
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))

    def rank(item: pytest.Item) -> int:
        marker = item.get_closest_marker("xdist_group")
        group = marker.args[0] if marker and marker.args else item.nodeid
        path = item.nodeid.split("::", 1)[0]
        for position, unit in enumerate(LONGEST_FIRST):
            if group == unit or path == unit:
                return position
        return len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


class Stores:
    """Fresh MLflow backend stores: a SQLite file, or a new database on the session's PostgreSQL."""

    def __init__(self, postgres: PostgresServer | None) -> None:
        self.postgres = postgres

    def new_uri(self, root: Path, name: str) -> str:
        """The URI of a new, empty store named ``name`` (a file in ``root`` on SQLite)."""
        if self.postgres is None:
            return f"sqlite:///{root}/{name}.db"
        return self.postgres.create_database(name)


@pytest.fixture(scope="session")
def stores(request: pytest.FixtureRequest) -> Iterator[Stores]:
    if request.config.getoption("--store") == "sqlite":
        yield Stores(None)
        return
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true and --store postgresql, but {INSTALL_HINT}", pytrace=False)
        pytest.skip(INSTALL_HINT)
    server = PostgresServer(bindir, _free_port())
    try:
        server.start()
        yield Stores(server)
    finally:
        server.stop()


class Env:
    """Paths and environment of the test session."""

    def __init__(self, root: Path, tracking_uri: str) -> None:
        self.root = root
        self.tracking_uri = tracking_uri
        self.home = root / "deploy-home"
        self.vars = {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_DEPLOY_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
        }

    def environ(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **self.vars, **extra}

    def cli(self, *args: str, check: bool = True, timeout: float = 240, env: dict | None = None,
            ) -> subprocess.CompletedProcess:
        """Run the real `mlflow deployments ...` CLI in a subprocess."""
        mlflow_bin = str(Path(sys.executable).parent / "mlflow")
        proc = subprocess.run([mlflow_bin, "deployments", *args], capture_output=True, text=True,
                              timeout=timeout, env=env or self.environ(), cwd=self.root)
        if check and proc.returncode != 0:
            raise AssertionError(f"mlflow deployments {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def cli_here(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """`mlflow deployments ARGS` in this process: MLflow's own click group through click's CliRunner,
        the plugin loaded through its entry point as in a shell, with ``env`` (default: the session's)
        as the environment and its MLFLOW_TRACKING_URI as the tracking store. The answer has the shape
        :meth:`cli` gives: exit status, stdout and stderr, which ends, for an exception raised through
        the CLI, with the line Python prints last for it. For the tests where the command as a process
        is not the subject: a subprocess spends ~4 s of CPU importing MLflow, and every verb keeps its
        tests through the real CLI in a subprocess (tests/test_cli_verbs.py and others)."""
        from click.testing import CliRunner
        from mlflow.cli import cli

        environ = env or self.environ()
        changed = {key: value for key, value in environ.items() if os.environ.get(key) != value}
        with tracking_uri(environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri):
            result = CliRunner().invoke(cli, ["deployments", *args], env=changed)
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            error = type(result.exception)
            stderr += f"\n{error.__module__}.{error.__qualname__}: {result.exception}\n"
        proc = subprocess.CompletedProcess(["mlflow", "deployments", *args], result.exit_code, result.stdout, stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"mlflow deployments {' '.join(args)} failed in process ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def create(self, name: str, model_uri: str, *config: str, tracking: str | None = None,
               **environ: str) -> dict:
        """`mlflow deployments create -t lifecycle --name NAME -m MODEL_URI -C KEY=VALUE ...` in process,
        through MLflow's deployment client (what the CLI calls), against ``tracking`` (default: the
        session store) with ``environ`` added to the environment the deployment's processes inherit,
        as a CLI run with that environment would give them. A CLI subprocess would spend seconds of
        CPU importing MLflow; the verb has real-CLI tests (tests/test_cli_verbs.py and others)."""
        from mlflow.deployments import get_deploy_client

        settings = dict(item.split("=", 1) for item in config)
        added = {**({"MLFLOW_TRACKING_URI": tracking} if tracking else {}), **environ}
        saved = {key: os.environ.get(key) for key in added}
        os.environ.update(added)
        try:
            with tracking_uri(tracking or self.tracking_uri):
                return get_deploy_client("lifecycle").create_deployment(name, model_uri, config=settings)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def status(self, name: str) -> dict:
        return json.loads((self.home / "deployments" / name / "status.json").read_text())

    def delete(self, name: str, home: Path | None = None) -> None:
        """Clean-up in process, through the deployment core the CLI's `delete` calls: stops every
        process of ``name``, archives its folder, clears its registry serving tags. A `mlflow
        deployments delete` subprocess costs ~5 s of CPU in imports; the verb has its own tests
        (tests/test_cli_verbs.py). Like ``cli(..., check=False)``, a failure does not raise (it is
        warned): what is left running, the session's end kills."""
        from mlflow_deploy_plugin.deployments import Deployments
        from mlflow_deploy_plugin.state import StateStore

        try:
            Deployments(store=StateStore(home or self.home)).delete(name)
        except Exception as exc:  # in a `finally`: never hide the test's own failure
            import warnings

            warnings.warn(f"in-process delete of {name!r} failed: {exc!r}", stacklevel=2)


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """The test process's MLflow client talks to ``uri`` meanwhile (a module's tracking server)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _kill_everything_under(home: Path) -> None:
    """Stop every supervisor and worker a test left behind (tests must not leak processes).

    Besides the pids ``status.json`` lists (draining, pending and a dead supervisor's orphaned
    workers included), any process whose command line names a folder under ``home``: a supervisor
    an orphaned worker started, or one that lost the race for the lock, is found that way too.
    """
    pids: set[int] = set()
    for status_file in list(home.glob("deployments/*/status.json")) + list(home.glob("archive/*/status.json")):
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):
            continue
        for key in ("pid", "agent_pid", "standby_pid", "worker_pids", "other_pids", "serving_pids"):
            value = status.get(key)
            pids.update(pid for pid in (value if isinstance(value, list) else [value]) if isinstance(pid, int))
    pids.update(processes_under(home))
    for pid in pids:
        if pid and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def processes_under(home: Path) -> list[int]:
    """Pids of the processes whose command line names ``home`` or a path below it."""
    marker = str(home).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg == marker or arg.startswith(marker + b"/") for arg in argv):
            found.append(int(entry.name))
    return found


def _run_root(factory: pytest.TempPathFactory) -> Path:
    """This test run's temp root: an xdist worker's basetemp is a `popen-gwN` folder inside it."""
    base = factory.getbasetemp()
    return base.parent if base.name.startswith("popen-") else base


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The last safety net, run once by the process that started the run (the xdist controller):
    kill whatever is still running from this run's temp root (deployments, tracking servers,
    PostgreSQL, the Ray cluster), e.g. after Ctrl-C, when xdist kills its workers before their
    session fixtures could stop what they started."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if hasattr(session.config, "workerinput") or factory is None or factory._basetemp is None:
        return
    root = _run_root(factory)
    markers = (f"{root}/".encode(), f"/tmp/ray-{root.name}-".encode())
    # A `create` still running when the workers were interrupted may start its supervisor after a
    # first sweep (supervisors start their own session, so Ctrl-C never reaches them): sweep until
    # two sweeps in a row, a second apart, find nothing (bounded).
    quiet, deadline = 0, time.monotonic() + 30
    while quiet < 2 and time.monotonic() < deadline:
        killed = _kill_matching(markers)
        quiet = 0 if killed else quiet + 1
        time.sleep(1.0 if quiet < 2 else 0)


def _kill_matching(markers: tuple[bytes, ...]) -> int:
    """SIGKILL every process whose command line or environment contains one of ``markers``; how many were."""
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            # The environment too: a peer such as `mlflow models serve` names no temp path in its
            # arguments, only in the tracking URI and home it was given.
            argv = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(marker in argv for marker in markers):
            pid = int(entry.name)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                # A group leader (`ray start`, a tracking server, PostgreSQL: started in a session of
                # their own) takes its group along: Ray's agents rename themselves ("ray::...") and
                # would otherwise be missed.
                if os.getpgid(pid) == pid and pid != os.getpgrp():
                    os.killpg(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory, stores: Stores) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("session")
    tracking_uri = os.environ.get("MLFLOW_TEST_TRACKING_URI") or stores.new_uri(root, "mlflow")
    session_env = Env(root, tracking_uri)
    saved = {key: os.environ.get(key) for key in session_env.vars}
    os.environ.update(session_env.vars)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    # Client-side stores put artifacts under the working directory: keep them in the temp folder.
    previous_cwd = os.getcwd()
    os.chdir(root)
    try:
        yield session_env
    finally:
        _kill_everything_under(session_env.home)
        os.chdir(previous_cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Registry:
    """The registered models every test may use."""

    def __init__(self, model: str, broken_model: str, failing_model: str) -> None:
        self.model = model
        self.broken_model = broken_model
        self.failing_model = failing_model
        self.features, self.target = load_data()


@pytest.fixture(scope="session")
def registry(env: Env) -> Registry:
    import mlflow

    suffix = str(int(time.time() * 1000))[-8:]  # unique names on a shared PostgreSQL store
    model = f"{MODEL}_{suffix}"
    train(model, c=1.0, alias="champion", experiment=f"tests-{suffix}")
    train(model, c=0.05, experiment=f"tests-{suffix}")

    # A version whose artifacts are damaged: it must never take over a deployment.
    broken = f"broken_{suffix}"
    features, _ = load_data()
    with mlflow.start_run():
        from sklearn.linear_model import LogisticRegression

        info = mlflow.sklearn.log_model(LogisticRegression().fit(features, features.index % 2), name="model",
                                        registered_model_name=broken, pip_requirements=PIP_REQUIREMENTS)
    location = mlflow.get_logged_model(info.model_id).artifact_location
    artifacts = Path(location.removeprefix("file://"))
    assert (artifacts / "MLmodel").exists(), f"unexpected artifact layout at {artifacts}"
    for item in artifacts.iterdir():
        if item.name != "MLmodel":
            (shutil.rmtree if item.is_dir() else os.unlink)(item)

    # A version that loads but cannot predict its own input example: the smoke test must stop it.
    failing = f"failing_{suffix}"
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=str(REPO / "tests/assets/failing_model.py"),
                                input_example=features.head(2), registered_model_name=failing,
                                pip_requirements=["pandas"])
    return Registry(model, broken, failing)


class Regressor:
    """A small registered regressor (scikit-learn's bundled diabetes data): version 1 of ``model``."""

    def __init__(self, model: str, features: pd.DataFrame, target: pd.Series) -> None:
        self.model, self.features, self.target = model, features, target


@pytest.fixture(scope="session")
def regressor(env: Env) -> Regressor:
    import mlflow
    from mlflow.models import infer_signature
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    data = load_diabetes(as_frame=True)
    model = f"diabetes_{str(int(time.time() * 1000))[-8:]}"
    mlflow.set_experiment(f"tests-{model}")
    with mlflow.start_run():
        fitted = Ridge(alpha=0.1).fit(data.data, data.target)
        mlflow.log_metric("mae", float(abs(fitted.predict(data.data) - data.target).mean()))
        mlflow.sklearn.log_model(fitted, name="model", registered_model_name=model, pip_requirements=PIP_REQUIREMENTS,
                                 signature=infer_signature(data.data, fitted.predict(data.data)))
    return Regressor(model, data.data, data.target)


@pytest.fixture(scope="session")
def shared_deployment(env: Env, registry: Registry) -> Iterator[dict]:
    """One running deployment of version 1 for tests that only read from it."""
    name = "shared"
    # No warm standby: nothing swaps or restarts here (a spare worker costs ~5 s of CPU per xdist worker).
    env.cli("create", "-t", "lifecycle", "--name", name, "-m", f"models:/{registry.model}/1",
            "-C", "max_body_mb=1", "-C", "warm_standby=false")
    status = env.status(name)
    yield {"name": name, "url": status["url"], **status}
    env.delete(name)


def post_json(url: str, payload, timeout: float = 30, **headers: str) -> requests.Response:
    return requests.post(f"{url}/invocations", data=json.dumps(payload) if not isinstance(payload, bytes | str)
                         else payload, headers={"Content-Type": "application/json", **headers}, timeout=timeout)


def split_payload(frame: pd.DataFrame) -> dict:
    return {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}


class TrafficThreads:
    """Client threads started on enter and stopped (joined, bounded) on exit; each loop checks
    ``stop_event`` and its own deadline so it ends by itself."""

    threads: list[threading.Thread]
    stop_event: threading.Event

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=60)


class CountingTraffic(TrafficThreads):
    """One keep-alive client posting ``payloads`` in turn (cycling), counting the (X-Model-Version,
    status) of every answer; what never got an answer goes to ``failures``. Bounded in time by itself."""

    def __init__(self, url: str, payloads: list[dict], max_seconds: float = 400) -> None:
        self.url, self.payloads = url, payloads
        self.answers: Counter[tuple[str, int]] = Counter()
        self.failures: list[str] = []
        self.stop_event = threading.Event()
        self.deadline = time.monotonic() + max_seconds
        self.threads = [threading.Thread(target=self._run, daemon=True)]

    def _run(self) -> None:
        session, i = requests.Session(), 0
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            try:
                response = session.post(f"{self.url}/invocations", json=self.payloads[i % len(self.payloads)],
                                        timeout=30)
                self.answers[(response.headers.get("x-model-version", "?"), response.status_code)] += 1
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            i += 1

    @property
    def count(self) -> int:
        """Answers so far, whatever their status."""
        return sum(self.answers.values())


class RequestLoop(TrafficThreads):
    """Steady single-row traffic from a few keep-alive clients; bounded in time by itself.

    ``versions`` has every client's answers in arrival order; ``per_client[i]`` has client i's own
    answers as (monotonic time the request was sent, version), in order.
    """

    def __init__(self, url: str, payload: dict, clients: int = 3, max_seconds: float = 540) -> None:
        self.url, self.payload = url, payload
        self.stop_event = threading.Event()
        self.failures: list[str] = []
        self.versions: list[str] = []
        self.per_client: list[list[tuple[float, str]]] = [[] for _ in range(clients)]
        self.count = 0
        self.max_seconds = max_seconds
        self.deadline = time.monotonic() + max_seconds
        self.in_flight_since: list[float | None] = [None] * clients
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def wait_for_answers(self, more: int, timeout_s: float, what: str) -> None:
        """Wait until ``more`` further successful answers arrive; on timeout say what the clients
        were doing (failures, requests still in flight), so a stall and an error look different."""
        target = len(self.versions) + more

        def arrived() -> bool:
            if time.monotonic() > self.deadline:
                raise AssertionError(f"the request loop ended by itself (its bound, {self.max_seconds:.0f} s, "
                                     f"is shorter than the test)")
            return len(self.versions) >= target

        try:
            wait_for(arrived, timeout_s, what)
        except AssertionError as exc:
            now = time.monotonic()
            in_flight = [None if since is None else round(now - since, 1) for since in self.in_flight_since]
            raise AssertionError(
                f"{exc}; answers {len(self.versions)}/{target}, attempts {self.count}, "
                f"failures {len(self.failures)} (last: {self.failures[-3:]}), "
                f"seconds each client's request has been in flight: {in_flight}") from None

    def _run(self, client: int) -> None:
        session = requests.Session()
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            sent = time.monotonic()
            self.in_flight_since[client] = sent
            try:
                response = session.post(f"{self.url}/invocations", json=self.payload, timeout=30)
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code}: {response.text[:200]}")
                else:
                    self.versions.append(response.headers["x-model-version"])
                    self.per_client[client].append((sent, response.headers["x-model-version"]))
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            self.in_flight_since[client] = None
            self.count += 1


free_port = _free_port


@contextlib.contextmanager
def mlflow_server_for_module(stores: Stores, factory: pytest.TempPathFactory, name: str) -> Iterator[MlflowServer]:
    """A tracking server of a test module's own (a fresh store named ``name``), up and then stopped:
    for the tests that restart the server, subscribe it to webhooks or change its stages."""
    root = factory.mktemp(name)
    server = MlflowServer(root, store_uri=stores.new_uri(root, name))
    try:
        server.wait_ready(90)
        yield server
    finally:
        server.stop()


class MlflowServer:
    """`mlflow server` in its own process group, so every process it starts is stopped. Its backend
    store is ``store_uri`` (from the ``stores`` fixture), by default a SQLite file in ``root``."""

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None, store_uri: str | None = None) -> None:
        from cryptography.fernet import Fernet

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "mlflow-server.log"
        env = {
            **os.environ,
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",  # our receiver is plain http ...
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",  # ... on loopback
            # The store encrypts webhook secrets with this Fernet key (a random one per process if unset).
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
            # The job runner is a second full MLflow process; not needed here and it doubles start-up.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **(extra_env or {}),
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        mlflow_bin = str(Path(sys.executable).parent / "mlflow")
        self._command = [mlflow_bin, "server", "--backend-store-uri", store_uri or f"sqlite:///{root}/mlflow.db",
                         "--default-artifact-root", str(root / "art"), "--host", "127.0.0.1", "--port",
                         str(self.port), "--workers", "1"]
        self._env, self._root = env, root
        self._start("wb")

    def _start(self, mode: str) -> None:
        self._log = self.log_path.open(mode)
        self.proc = subprocess.Popen(self._command, env=self._env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self._root)

    def restart(self, timeout_s: float = 90) -> None:
        """Start the stopped server again on the same port and store (an outage that ends)."""
        self._start("ab")
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited:\n{self.log_path.read_text()[-3000:]}")
            return requests.get(f"{self.url}/health", timeout=2).status_code == 200

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if up():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"mlflow server not up after {timeout_s}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # Workers of the group may outlive the CLI parent for a moment: make sure none is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()




def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children first found through /proc's parent pids)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def ray_cluster(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real local Ray cluster (2 CPUs, no dashboard), started once per session and stopped at the end.

    Its address goes to RAY_ADDRESS, so the `mlflow deployments -t lifecycle:/ray` subprocesses and
    the in-process engine find it. Skipped when ray[serve] is not installed, except in CI, where
    `make test` installs it and a skip would hide the Ray engine.
    """
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("ray[serve] is not installed in CI: `make test` installs the dev extra, which has it")
        pytest.skip("ray[serve] is not installed (pip install -e '.[ray]'): the Ray engine tests need it")
    import tempfile

    # Ray puts unix sockets under its temp dir: keep the path short (the socket path limit is 107).
    # Named after the run, so the run's last safety net (pytest_sessionfinish) can find the cluster.
    temp = Path(tempfile.mkdtemp(prefix=f"ray-{_run_root(tmp_path_factory).name}-", dir="/tmp"))
    port = _free_port()
    log_path = tmp_path_factory.mktemp("ray-log") / "ray-start.log"
    log = log_path.open("wb")
    ray_bin = str(Path(sys.executable).parent / "ray")
    # --block keeps `ray start` in the foreground, in its own process group with everything it starts,
    # so the whole cluster is stopped by signalling that group (never `ray stop`, which would stop
    # every Ray cluster on the machine, a developer's own included).
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
         "--include-dashboard=false", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
         "--temp-dir", str(temp)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env.environ())
    address = f"127.0.0.1:{port}"
    saved = os.environ.get("RAY_ADDRESS")
    try:
        def started() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited:\n{log_path.read_text()[-3000:]}")
            return b"Ray runtime started" in log_path.read_bytes()

        deadline = time.monotonic() + 120
        while not started():
            if time.monotonic() > deadline:
                raise AssertionError(f"ray start not up after 120s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        os.environ["RAY_ADDRESS"] = address
        # Serve's HTTP proxy on a free loopback port (its default, 8000, may be taken here).
        serve_bin = str(Path(sys.executable).parent / "serve")
        subprocess.run([serve_bin, "start", "--address", address, "--http-host", "127.0.0.1",
                        "--http-port", str(_free_port())], check=True, capture_output=True, timeout=180,
                       env=env.environ())
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # this process joined as a driver (in-process engine tests)
        # Actor workers (Serve's controller, proxy and replicas) run in sessions of their own: find
        # every process the cluster started by parentage, not by process group.
        family = _descendants(proc.pid)
        proc.terminate()  # `ray start --block` stops what it started (GCS, raylet and so its workers)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for pid in family:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # whatever outlived its raylet
        wait_for(lambda: not any(_alive(pid) for pid in family), 10, "the Ray cluster's processes to be gone")
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
