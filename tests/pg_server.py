"""A throwaway PostgreSQL server for the tests: `initdb` in a temp dir, `pg_ctl` on a free loopback
port, one fresh database per store the tests ask for, everything stopped and removed at the end.

`initdb` and `postgres` refuse to run as root: as root (CI), both run as the ``postgres`` system user
that Debian's ``postgresql`` package creates, in a temp dir that user owns. The server listens on
127.0.0.1 only (and on a unix socket inside the temp dir), with a random password for TCP logins.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl) not found: install them with "
                "`apt-get install postgresql` (Debian/Ubuntu), or put their directory on PATH "
                "or in MLFLOW_TEST_PG_BIN")
USER = "mlflow"


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: $MLFLOW_TEST_PG_BIN if set (and only it), else PATH,
    then Debian's /usr/lib/postgresql/<version>/bin (newest first; Debian keeps them off PATH)."""
    if os.environ.get("MLFLOW_TEST_PG_BIN"):
        candidates = [Path(os.environ["MLFLOW_TEST_PG_BIN"])]
    else:
        on_path = shutil.which("initdb")
        debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)], reverse=True)
        candidates = [Path(on_path).resolve().parent] if on_path else []  # symlinks: the real dir
        candidates += debian
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


class PostgresServer:
    """One PostgreSQL server in its own temp dir; :meth:`stop` stops it and removes the dir."""

    def __init__(self, bindir: Path, port: int) -> None:
        self.bindir = bindir
        self.port = port
        self.password = secrets.token_hex(16)
        self._as_postgres = os.geteuid() == 0
        # Not under pytest's tmp dirs: as root those are 0700 root, which the postgres user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="mlflow-test-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._databases = 0
        if self._as_postgres:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root)
                raise RuntimeError("running as root, but there is no `postgres` system user to run "
                                   "PostgreSQL as (Debian's postgresql package creates it)") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:1])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")

    def start(self) -> None:
        """initdb, then start the server and wait until it accepts connections."""
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_postgres:
            shutil.chown(pwfile, "postgres")
        try:
            self._run("initdb", "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile), "-E", "UTF8",
                      "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256")
        finally:
            pwfile.unlink()
        # A throwaway server: durability settings off, as for any test database.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg2://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database (a fresh MLflow store); returns its SQLAlchemy URI."""
        import psycopg2

        self._databases += 1
        database = f"{re.sub(r'[^a-z0-9_]', '_', name.lower())[:40]}_{self._databases}"
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                                      dbname="postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{database}"')
        finally:
            connection.close()
        return self.uri(database)

    def stop(self) -> None:
        """Stop the server (fast shutdown; killed if it does not stop) and remove its temp dir."""
        try:
            if (self.data / "postmaster.pid").exists():
                try:
                    self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
                except (RuntimeError, subprocess.TimeoutExpired):
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        pid = int((self.data / "postmaster.pid").read_text().split()[0])
                        os.kill(pid, signal.SIGKILL)  # its backends exit once the postmaster is gone
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
