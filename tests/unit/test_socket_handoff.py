"""The listening-socket handoff to a successor supervisor (``engines/local/handoff.py``), in process:
the fd received is the very socket (what was queued on it before is accepted after), and it goes
to a supervisor of the same deployment only, within bounded time."""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlflow_deploy_plugin.engines.local.handoff import (
    HandoffRefused,
    HandoffServer,
    handoff_path,
    peer_credentials,
    request_socket,
)
from mlflow_deploy_plugin.engines.local.processes import SUPERVISOR_MODULE
from mlflow_deploy_plugin.engines.local.supervisor import Supervisor, bind_socket
from mlflow_deploy_plugin.state import DeploymentPaths


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = bind_socket("127.0.0.1", None)
    try:
        yield sock
    finally:
        sock.close()


def _root(tmp_path: Path, name: str = "dep") -> Path:
    root = tmp_path / "deployments" / name
    (root / "run").mkdir(parents=True)
    return root


def _offer(root: Path, sock: socket.socket, pid: int = 4242, anyone: bool = True) -> HandoffServer:
    """A worker's offer; ``anyone``: the test process may take it (it is no supervisor)."""
    server = HandoffServer(handoff_path(root / "run", pid), sock.fileno(), root,
                           is_successor=(lambda _pid: True) if anyone else None)
    server.start()
    return server


def test_the_fd_handed_over_is_the_very_listening_socket(tmp_path: Path, listening: socket.socket) -> None:
    root = _root(tmp_path)
    address = listening.getsockname()
    queued = socket.create_connection(address, timeout=5)  # waits in the accept queue, never accepted here
    server = _offer(root, listening)
    try:
        fd = request_socket(server.path, root, timeout_s=5)
    finally:
        server.close()
    received = socket.socket(fileno=fd)
    try:
        # One socket, not a second one on the same port: same inode, same address, listening.
        assert os.fstat(fd).st_ino == os.fstat(listening.fileno()).st_ino
        assert received.getsockname() == address
        assert received.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert server.handed_to == [os.getpid()]
        listening.close()  # the old holders let go (the worker's duplicate went with close())
        queued.sendall(b"before")
        received.settimeout(5)
        conn, _ = received.accept()  # the connection queued before the handoff, not reset
        with conn, queued:
            conn.settimeout(5)
            assert conn.recv(16) == b"before"
        with socket.create_connection(address, timeout=5) as later:  # and new ones keep coming
            conn, _ = received.accept()
            with conn:
                later.sendall(b"after")
                conn.settimeout(5)
                assert conn.recv(16) == b"after"
    finally:
        received.close()


def test_control_socket_is_owner_only_and_gone_after_close(tmp_path: Path, listening: socket.socket) -> None:
    root = _root(tmp_path)
    server = _offer(root, listening)
    assert stat.S_ISSOCK(server.path.stat().st_mode)
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700
    server.close()
    assert not server.path.exists()
    with pytest.raises(HandoffRefused):  # nobody answers there any more
        request_socket(server.path, root, timeout_s=2)


def test_a_deep_deployment_folder_beyond_the_unix_path_limit_works(tmp_path: Path,
                                                                    listening: socket.socket) -> None:
    root = _root(tmp_path / ("d" * 60) / ("e" * 60))
    assert len(str(handoff_path(root / "run", 4242))) > 108
    server = _offer(root, listening)
    try:
        fd = request_socket(server.path, root, timeout_s=5)
        os.close(fd)
    finally:
        server.close()


def test_never_handed_to_another_deployment_nor_to_a_process_that_is_not_its_supervisor(
        tmp_path: Path, listening: socket.socket) -> None:
    root, other = _root(tmp_path), _root(tmp_path, "other")
    server = _offer(root, listening)
    try:
        with pytest.raises(HandoffRefused, match="another deployment"):
            request_socket(server.path, other, timeout_s=5)
    finally:
        server.close()
    # By default the peer must be a supervisor of this deployment, by its command line: this test
    # process is not.
    strict = _offer(root, listening, anyone=False)
    try:
        with pytest.raises(HandoffRefused, match="not a supervisor of this deployment"):
            request_socket(strict.path, root, timeout_s=5)
        assert strict.handed_to == []
    finally:
        strict.close()


def _ask_as_supervisor_of(root: Path, path: Path) -> subprocess.CompletedProcess:
    """A real process whose command line names the supervisor module and ``root`` asks at ``path``."""
    code = ("import os, sys; from pathlib import Path; "
            "from mlflow_deploy_plugin.engines.local.handoff import request_socket, HandoffRefused\n"
            "try:\n"
            "    fd = request_socket(Path(sys.argv[3]), Path(sys.argv[2]), timeout_s=10)\n"
            "except HandoffRefused as exc:\n"
            "    print('refused', exc)\n"
            "else:\n"
            "    print('inode', os.fstat(fd).st_ino)\n")
    return subprocess.run([sys.executable, "-c", code, SUPERVISOR_MODULE, str(root), str(path)],
                          capture_output=True, text=True, timeout=60, check=True)


def test_a_supervisor_of_the_deployment_gets_it_one_of_another_does_not(tmp_path: Path,
                                                                         listening: socket.socket) -> None:
    root, other = _root(tmp_path), _root(tmp_path, "other")
    server = _offer(root, listening, anyone=False)
    try:
        ours = _ask_as_supervisor_of(root, server.path)
        assert ours.stdout.split() == ["inode", str(os.fstat(listening.fileno()).st_ino)], ours
        theirs = _ask_as_supervisor_of(other, server.path)  # it names its own folder: refused
        assert theirs.stdout.startswith("refused") and "another deployment" in theirs.stdout, theirs
        assert len(server.handed_to) == 1
    finally:
        server.close()


@pytest.mark.parametrize("spelled_by", ["successor", "worker"])
def test_a_supervisor_reaching_the_home_through_a_symlink_still_gets_it(
        tmp_path: Path, listening: socket.socket, spelled_by: str) -> None:
    """``$MLFLOW_DEPLOY_HOME`` through a symlink (``up`` from cron, the plugin from a shell): one
    folder, two spellings. Either side may hold the link; the socket is handed over all the same."""
    real = _root(tmp_path / "real")
    link_home = tmp_path / "linked-home"
    link_home.symlink_to(tmp_path / "real")
    linked = link_home / "deployments" / "dep"
    assert str(linked) != str(real) and linked.resolve() == real.resolve()
    worker_root, successor_root = (real, linked) if spelled_by == "successor" else (linked, real)
    server = _offer(worker_root, listening, anyone=False)
    try:
        ours = _ask_as_supervisor_of(successor_root, server.path)
        assert ours.stdout.split() == ["inode", str(os.fstat(listening.fileno()).st_ino)], ours
        # A folder of the same name elsewhere is still another deployment.
        elsewhere = _root(tmp_path / "elsewhere")
        theirs = _ask_as_supervisor_of(elsewhere, server.path)
        assert theirs.stdout.startswith("refused"), theirs
        assert len(server.handed_to) == 1
    finally:
        server.close()


def test_peer_credentials_name_the_process_at_the_other_end() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert peer_credentials(left) == (os.getpid(), os.geteuid(), os.getegid())


def test_a_worker_that_never_answers_costs_a_bounded_wait(tmp_path: Path) -> None:
    path = tmp_path / "run" / "handoff" / "99.sock"
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as mute:  # listens, never accepts nor answers (a frozen worker)
        mute.bind(str(path))
        mute.listen(1)
        started = time.monotonic()
        with pytest.raises(HandoffRefused, match="no answer|timed out"):
            request_socket(path, tmp_path, timeout_s=0.5)
        assert time.monotonic() - started < 5


def test_a_successor_takes_the_socket_from_the_first_worker_that_hands_it(
        tmp_path: Path, listening: socket.socket, caplog: pytest.LogCaptureFixture) -> None:
    root = _root(tmp_path)
    supervisor = Supervisor(DeploymentPaths(root), respawn=True)
    host, port = listening.getsockname()
    # The first orphan is gone (no control socket), the second hands its socket over.
    supervisor.orphans = {111111: None, 4242: None}
    server = _offer(root, listening, pid=4242)
    try:
        with caplog.at_level(logging.INFO, logger="mlflow_deploy_plugin.supervisor"):
            sock = supervisor._socket_from_orphans(host, port)
        assert sock is not None
        with sock:
            assert os.fstat(sock.fileno()).st_ino == os.fstat(listening.fileno()).st_ino
        assert "from worker 4242 by handoff" in caplog.text
        # A socket on another port is not this deployment's: never served on; then SO_REUSEPORT,
        # and the log says what that costs.
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mlflow_deploy_plugin.supervisor"):
            assert supervisor._socket_from_orphans(host, port + 1 if port < 65535 else port - 1) is None
        assert "not a listening socket on" in caplog.text and "SO_REUSEPORT" in caplog.text
    finally:
        server.close()


def test_a_deleted_deployment_folder_is_never_brought_back(tmp_path: Path, listening: socket.socket) -> None:
    root = tmp_path / "deployments" / "gone"  # archived meanwhile: no run/ folder any more
    server = HandoffServer(handoff_path(root / "run", 4242), listening.fileno(), root)
    with pytest.raises(FileNotFoundError):
        server.start()
    server.close()
    assert not root.exists()


def test_only_workers_that_outlive_their_supervisor_offer_their_socket(tmp_path: Path,
                                                                        listening: socket.socket) -> None:
    from mlflow_deploy_plugin.serving.worker import Supervision, _offer_handoff

    root = _root(tmp_path)
    assert _offer_handoff(Supervision(deployment=DeploymentPaths(root), on_orphan="exit"), listening.fileno()) is None
    offered = _offer_handoff(Supervision(deployment=DeploymentPaths(root), on_orphan="serve"), listening.fileno())
    assert offered is not None
    try:
        assert offered.path == handoff_path(root / "run", os.getpid()) and offered.path.exists()
    finally:
        offered.close()


def test_a_state_store_spells_a_symlinked_or_relative_home_one_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever opens the store (CLI option, plugin, agent, tests), one folder has one path: the one
    its processes are started with and recognised by."""
    from mlflow_deploy_plugin.state import StateStore

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    real = (tmp_path / "real").resolve()
    assert StateStore(tmp_path / "link").home == real
    assert StateStore(Path("link")).home == real
    assert StateStore(tmp_path / "real").paths("churn").root == real / "deployments" / "churn"
