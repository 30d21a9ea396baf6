"""A throwaway PostgreSQL server for tests: initdb into a temporary folder, started on a free port of
127.0.0.1 with its socket in that folder, one user with a password and one database; stopped and
removed afterwards. The server binaries are Debian's (`apt-get install postgresql`, which .ci/run
does) or any on PATH. PostgreSQL refuses to run as root: as root, the server runs as the `postgres`
system user that Debian's package creates."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SERVER_USER = "postgres"  # Debian's package creates this system user


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    db_name: str
    socket_dir: Path
    data_dir: Path

    def connect(self):
        """A psycopg2 connection as the test user, over TCP with the password."""
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=self.db_name
        )


def server_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else the newest of Debian's
    /usr/lib/postgresql/<major>/bin; None when there are none."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    debian = [
        p.parent
        for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
        if p.parent.parent.name.isdigit() and (p.parent / "initdb").exists()
    ]
    return max(debian, key=lambda folder: int(folder.parent.name)) if debian else None


def why_no_server() -> str | None:
    """Why no throwaway server can start here, or None when one can."""
    if server_binaries() is None:
        return "PostgreSQL's server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root, and there is no {SERVER_USER!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root, and runuser (util-linux) is missing to run PostgreSQL as another user"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def postgres_server(
    user: str = "loraflow", password: str = "pg pass@word", db_name: str = "dagster"
) -> Iterator[PostgresServer]:
    """Start a throwaway server; yield how to reach it; stop it and delete its files."""
    reason = why_no_server()
    if reason:
        raise RuntimeError(reason)
    binaries = server_binaries()
    assert binaries is not None
    # not under pytest's tmp_path: that is private to the user running pytest, and as root the
    # server runs as another user, which must own its folder
    root = Path(tempfile.mkdtemp(prefix="loraflow-postgres-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam(SERVER_USER)
        os.chown(root, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", SERVER_USER, "--"]
    data_dir, socket_dir, log = root / "data", root / "socket", root / "server.log"

    def as_server_user(*command: str) -> None:
        result = subprocess.run([*run_as, *command], capture_output=True, text=True, cwd=root)
        if result.returncode != 0:
            server_log = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}{server_log}"
            )

    port = free_port()
    started = False
    try:
        as_server_user("mkdir", "-m", "700", str(socket_dir))
        # trust on the socket, which only this folder's owner can reach; passwords over TCP
        as_server_user(
            str(binaries / "initdb"),
            "--pgdata",
            str(data_dir),
            "--username",
            SERVER_USER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        # a throwaway server: durability settings off, nothing survives the test anyway
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {socket_dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        as_server_user(
            str(binaries / "pg_ctl"), "start", "--wait", "-D", str(data_dir), "-l", str(log), "-o", options
        )
        started = True
        _create_user_and_database(socket_dir, port, user, password, db_name)
        yield PostgresServer("127.0.0.1", port, user, password, db_name, socket_dir, data_dir)
    finally:
        if started:
            as_server_user(str(binaries / "pg_ctl"), "stop", "--wait", "-D", str(data_dir), "-m", "immediate")
        shutil.rmtree(root, ignore_errors=True)


def _create_user_and_database(socket_dir: Path, port: int, user: str, password: str, db_name: str) -> None:
    import psycopg2
    from psycopg2 import sql

    admin = psycopg2.connect(host=str(socket_dir), port=port, user=SERVER_USER, dbname="postgres")
    admin.autocommit = True  # CREATE DATABASE refuses to run in a transaction
    try:
        with admin.cursor() as cursor:
            cursor.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(user)), [password]
            )
            cursor.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db_name), sql.Identifier(user))
            )
    finally:
        admin.close()
