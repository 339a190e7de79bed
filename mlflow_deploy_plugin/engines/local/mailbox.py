"""Requests from CLI processes to a running supervisor, as files (standard library only).

The CLI writes ``requests/<id>.request.json`` atomically; the supervisor picks it up on its next
tick and answers with ``<id>.result.json``. Files rather than a socket because the supervisor must
stay reachable by any process on the machine with access to the deployment's folder (file
permissions are the access control), and a request survives a slow supervisor tick, even the
replacement of a supervisor that died: its successor answers what is waiting. A request whose
client has died meanwhile (it carries the client's pid) is dropped unanswered, so a successor never
acts on a stale ``stop``.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlflow_deploy_plugin.state import pid_alive, read_json, write_json_atomic


class MailboxTimeout(TimeoutError):
    """The supervisor did not answer in time."""


class SupervisorGone(RuntimeError):
    """The supervisor exited before answering."""


class Mailbox:
    """One deployment's request folder, seen from either side."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._seen: set[str] = set()

    # -- client side ---------------------------------------------------------------------------

    def ask(self, request: dict[str, Any], timeout_s: float, alive: Callable[[], bool]) -> dict[str, Any]:
        """Send ``request`` and wait for the answer; ``alive`` says whether anyone can still answer."""
        request_id = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        request_path = self.folder / f"{request_id}.request.json"
        result_path = self.folder / f"{request_id}.result.json"
        write_json_atomic(request_path, dict(request, client_pid=os.getpid()))
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                answer = read_json(result_path)
                if answer is not None:
                    return answer
                if not alive():
                    raise SupervisorGone(f"the supervisor exited before answering {request.get('op')!r}")
                time.sleep(0.05)
            raise MailboxTimeout(f"no answer to {request.get('op')!r} within {timeout_s:.0f}s")
        finally:
            for path in (request_path, result_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    # -- supervisor side -----------------------------------------------------------------------

    def new_requests(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Requests not seen before, oldest first."""
        for path in sorted(self.folder.glob("*.request.json")):
            request_id = path.name.removesuffix(".request.json")
            if request_id in self._seen:
                continue
            self._seen.add(request_id)
            try:
                request = read_json(path) or {}
            except ValueError:
                request = {}
            client = request.get("client_pid")
            if isinstance(client, int) and not pid_alive(client):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # nobody waits for this answer any more
                continue
            yield request_id, request

    def answer(self, request_id: str, answer: dict[str, Any]) -> None:
        write_json_atomic(self.folder / f"{request_id}.result.json", answer)
