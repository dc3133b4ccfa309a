"""Real servers for the scale-out tests: a private PostgreSQL and an MLflow tracking server.

PostgreSQL comes from the system's binaries (Debian's ``postgresql`` package, which ``.ci/run``
installs); it runs from a temporary folder, listens on 127.0.0.1 only, on a free port, with
trust authentication for its one user. PostgreSQL refuses to run as root, so under root the
server runs as the unprivileged ``postgres`` user (created by the package) or ``nobody``. The
MLflow server stores runs in that PostgreSQL and artifacts in a temporary folder. Each fixture
stops its server when the session ends. Without the binaries the tests that need them are
skipped, with the reason shown by ``pytest -ra``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "fairbench"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else the newest under /usr/lib/postgresql."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _server_user() -> str | None:
    """The unprivileged account PostgreSQL runs as under root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise UnavailableError("running as root and no unprivileged 'postgres' or 'nobody' account to run PostgreSQL as")


@dataclass
class Postgres:
    port: int
    folder: Path

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres", autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class UnavailableError(RuntimeError):
    """The server's binaries are missing here; tests that need it are skipped."""


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A private PostgreSQL on 127.0.0.1 in a temporary folder, stopped and removed on exit."""
    binaries = postgres_bin()
    if binaries is None:
        raise UnavailableError("PostgreSQL binaries (initdb, pg_ctl) not found; install Debian's 'postgresql' package")
    user = _server_user()
    folder = Path(tempfile.mkdtemp(prefix="fairbench-pg-"))
    data = folder / "data"
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    port = free_port()

    def pg(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(binaries / args[0]), *args[1:]],
            user=user,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    try:
        pg("initdb", "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-o", options, "-w", "-t", "120", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr or exc.stdout}") from None
    try:
        yield Postgres(port=port, folder=folder)
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float) -> None:
    """Poll ``url``/health until it answers, the process exits or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with code {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the MLflow server did not answer within {seconds:.0f} s")


@contextlib.contextmanager
def running_mlflow_server(postgres: Postgres, folder: Path) -> Iterator[str]:
    """An MLflow tracking server on 127.0.0.1 with runs in ``postgres`` and artifacts in
    ``folder``; yields its URL and stops it (and its workers) on exit."""
    backend = postgres.create_database("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
        "--artifacts-destination", (folder / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, proc, seconds=300)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group it leads
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL for the session; the test is skipped where its binaries are missing."""
    try:
        with running_postgres() as server:
            yield server
    except UnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """An MLflow tracking server on PostgreSQL for the session; yields its URL."""
    with running_mlflow_server(postgres, tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url
