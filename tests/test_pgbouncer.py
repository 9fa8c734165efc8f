"""Workers through PgBouncer in transaction-pooling mode.

The workers' connections go through a real PgBouncer (Debian's) with
prepared statements off; the supervisor's LISTEN connection bypasses it
through ``database.listen_dsn``, as transaction pooling cannot carry LISTEN.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devtools.devcluster import free_port
from harness import Daemon, daemon_config
from pdoflowd.client import Client
from pdoflowd.status import PostingStatus

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture
def bouncer(dsn: str) -> Iterator[str]:
    if not os.path.exists(PGBOUNCER):
        pytest.skip("PgBouncer is not installed (apt-get install pgbouncer)")
    target = conninfo_to_dict(dsn)
    port = free_port()
    # Outside pytest's private tmp tree: the postgres user must read it.
    workdir = Path(tempfile.mkdtemp(prefix="pdoflowd-bouncer-"))
    workdir.chmod(0o755)
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host={target['host']} port={target['port']} user=postgres\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        f"unix_socket_dir = {workdir}\n"
        "auth_type = any\n"
        "pool_mode = transaction\n"
        "admin_users = postgres\n"
        "ignore_startup_parameters = extra_float_digits\n"
        f"logfile = {workdir / 'pgbouncer.log'}\n"
        f"pidfile = {workdir / 'pgbouncer.pid'}\n"
    )
    command = [PGBOUNCER, str(ini)]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root.
        subprocess.run(["chown", "-R", "postgres", str(workdir)], check=True)
        command = ["runuser", "-u", "postgres", "--", *command]
    proc = subprocess.Popen(command)
    through = make_conninfo(dsn, port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            psycopg.connect(through, prepare_threshold=None).close()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.1)
    try:
        yield through
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def pool_clients(through: str) -> list[tuple[Any, ...]]:
    admin = make_conninfo(through, dbname="pgbouncer")
    with psycopg.connect(
        admin, autocommit=True, prepare_threshold=None
    ) as conn:
        cur = conn.cursor()
        cur.execute("SHOW CLIENTS")
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_workers_drain_a_posting_through_pgbouncer_transaction_pooling(
    dsn: str, bouncer: str, tmp_path: Path
) -> None:
    config = daemon_config(
        bouncer,
        database={"prepared_statements": False, "listen_dsn": dsn},
        workers={"count": 3},
    )
    daemon = Daemon(tmp_path, config).start()
    try:
        daemon.wait_ready()
        clients = [
            c for c in pool_clients(bouncer) if c["database"] != "pgbouncer"
        ]
        assert len(clients) >= 3
        client = Client(bouncer)
        posting = client.post("jobfns.noop", [[i] for i in range(500)])
        state = client.wait(posting.id, 60, poll_interval=0.05)
        assert state.status is PostingStatus.FINISHED
        assert state.jobs["done"] == 500
        assert daemon.stop() == 0
    finally:
        daemon.close()
