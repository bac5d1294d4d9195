"""A throwaway PostgreSQL server for the test session, run from the machine's binaries.

:func:`start_server` makes a cluster in a temporary directory (``initdb -A trust``),
starts it on a free loopback port with its socket in that directory, and
:meth:`PostgresServer.stop` stops it (``-m immediate``: nothing in it is worth keeping)
and deletes the directory.  PostgreSQL refuses to run as root, so as root every command
runs as the ``postgres`` system user through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_SERVER_SETTINGS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    " -c full_page_writes=off -c max_connections=200"
)


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or the server would not start."""


@dataclass(frozen=True, slots=True)
class PostgresServer:
    """A running server: connect as user ``postgres`` on 127.0.0.1:``port``."""

    port: int
    root: Path
    pg_ctl: str
    run_as: str | None

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    async def create_database(self, name: str) -> None:
        """Create an empty database ``name`` (an identifier of letters, digits, ``_``)."""
        conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def drop_database(self, name: str) -> None:
        """Drop database ``name``, closing any connection still open to it."""
        conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def stop(self) -> None:
        """Stop the server at once and delete its directory."""
        try:
            _run(
                [self.pg_ctl, "-D", str(self.root / "data"), "stop", "-m", "immediate"], self.run_as
            )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def find_binaries() -> tuple[str, str]:
    """Paths of ``initdb`` and ``pg_ctl``: on PATH, else the newest /usr/lib/postgresql."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    for bin_dir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True):
        initdb, pg_ctl = f"{bin_dir}/initdb", f"{bin_dir}/pg_ctl"
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return initdb, pg_ctl
    raise PostgresUnavailable(
        "PostgreSQL binaries (initdb, pg_ctl) not found on PATH or under "
        "/usr/lib/postgresql/*/bin: install them (Debian: apt-get install postgresql) "
        "or set LEDGERFLOW_SKIP_POSTGRES=1 to skip the PostgreSQL tests"
    )


def start_server() -> PostgresServer:
    """Initialise and start a fresh cluster; raise :class:`PostgresUnavailable` on failure."""
    initdb, pg_ctl = find_binaries()
    run_as = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="ledgerflow-pg-"))
    if run_as is not None:
        shutil.chown(root, user=run_as, group=run_as)
    data, port = root / "data", _free_port()
    try:
        _run([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"], run_as)
        options = f"-p {port} -k {root} {_SERVER_SETTINGS}"
        log = root / "server.log"
        _run([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "start"], run_as, log)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return PostgresServer(port=port, root=root, pg_ctl=pg_ctl, run_as=run_as)


def _run(command: list[str], run_as: str | None, log: Path | None = None) -> None:
    if run_as is not None:
        command = ["runuser", "-u", run_as, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        server_log = log.read_text(errors="replace") if log is not None and log.exists() else ""
        raise PostgresUnavailable(
            f"{' '.join(command)} failed ({done.returncode}):\n"
            f"{done.stdout}{done.stderr}{server_log}"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _version(bin_dir: str) -> tuple[int, ...]:
    version = Path(bin_dir).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())
