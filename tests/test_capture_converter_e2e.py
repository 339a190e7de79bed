"""The capture converter of a real deployment: one per deployment (not one per worker), restarted
after kill -9 with nothing captured lost, and `delete` converts what a killed stop left in the spool."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import requests
from conftest import Env, Registry, processes_under, split_payload, wait_for

from mlflow_deploy_plugin.capture import read_capture
from mlflow_deploy_plugin.state import pid_alive

CONVERTER = b"mlflow_deploy_plugin.capture.converter"


def _converters(root: Path) -> list[int]:
    """Converter processes of the deployment whose folder is ``root``."""
    found = []
    for pid in processes_under(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if CONVERTER in argv:
            found.append(pid)
    return found


def _send(url: str, payload: dict, count: int, clients: int = 3) -> set[str]:
    """``count`` requests from a few keep-alive clients; the ids of the answered ones (all must be)."""
    ids: set[str] = set()
    failures: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        session = requests.Session()
        for _ in range(n):
            response = session.post(f"{url}/invocations", json=payload, timeout=60)
            with lock:
                if response.status_code == 200:
                    ids.add(response.headers["x-request-id"])
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client, args=(count // clients,)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures[:3]
    return ids


class Trickle:
    """One request every 0.25 s in the background: the converter always has work (an idle one exits)."""

    def __init__(self, url: str, payload: dict) -> None:
        self.url, self.payload = url, payload
        self.ids: set[str] = set()
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        while not self.stop.wait(0.25):
            response = session.post(f"{self.url}/invocations", json=self.payload, timeout=60)
            if response.status_code == 200:
                self.ids.add(response.headers["x-request-id"])
            else:
                self.failures.append(f"{response.status_code} {response.text[:200]}")

    def __enter__(self) -> Trickle:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


def _spooled(spool: Path, ids: set[str]) -> bool:
    """Every id's record is in a spool file (the request ids travel as text in the records)."""
    data = b"".join(path.read_bytes() for path in spool.glob("*/*") if path.suffix in (".open", ".seg"))
    return all(rid.encode() in data for rid in ids)


def _captured(root: Path) -> set[str]:
    return set(read_capture(str(root), columns=["_request_id"])["_request_id"])


def test_one_converter_per_deployment_healed_after_kill_and_delete_converts_the_spool(
        env: Env, registry: Registry) -> None:
    name = "cap-converter"
    # In process (the verb as a process: tests/test_cli_verbs.py); no spare worker: nothing swaps here.
    env.create(name, f"models:/{registry.model}/1", "workers=2", "warm_standby=false")
    root = env.home / "deployments" / name
    capture, spool = root / "capture", root / "capture" / ".spool"
    payload = split_payload(registry.features.iloc[[3]])
    try:
        url = env.status(name)["url"]
        first = _send(url, payload, 60)
        wait_for(lambda: _captured(capture) >= first, 120, "the first requests in Parquet")
        with Trickle(url, payload) as trickle:
            # One converter for the deployment, whatever the number of workers; the workers start none.
            converter = wait_for(lambda: env.status(name)["converter_pid"], 60, "the converter in status.json")
            assert _converters(root) == [converter]
            assert len(env.status(name)["worker_pids"]) == 2
            parent = int(Path(f"/proc/{converter}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert parent == env.status(name)["pid"], "the converter is the supervisor's child, not a worker's"

            # kill -9 of the converter: serving goes on, a new one converts what waited, nothing is lost.
            os.kill(converter, signal.SIGKILL)
            second = _send(url, payload, 60)
            again = wait_for(lambda: (p := env.status(name)["converter_pid"]) != converter and p, 60,
                             "a converter again")
            assert _converters(root) == [again]
        second |= trickle.ids
        assert not trickle.failures, trickle.failures[:3]
        wait_for(lambda: _captured(capture) >= first | second, 120, "the requests answered meanwhile in Parquet")

        # Everything killed at once with requests still in the spool (the converter stopped before
        # they were sent, so none is converted): no start comes, so `delete` converts them into the
        # archive. The supervisor is stopped first, so that it starts no converter meanwhile.
        stopped = [env.status(name)["pid"], *_converters(root)]
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):  # a converter may just have left, idle
                os.kill(pid, signal.SIGSTOP)
        third = _send(url, payload, 30)
        wait_for(lambda: _spooled(spool, third), 60, "the last requests to reach the spool files")
        victims = processes_under(root)
        for pid in victims:
            os.kill(pid, signal.SIGSTOP)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(pid) for pid in victims), 60, "every process to be gone")
        assert not _captured(capture) & third, "the last requests are only in the spool"
    finally:
        env.delete(name)
    assert not processes_under(root), "a process of the deleted deployment is left"
    archives = sorted((env.home / "archive").glob(f"{name}-*"))
    assert archives, "the deployment's folder is archived"
    archived = archives[-1] / "capture"
    assert _captured(archived) >= first | second | third
    assert not [p for p in (archived / ".spool").glob("*") if not p.name.startswith(".")], \
        "the spool is converted, not archived as it is"
