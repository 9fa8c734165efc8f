"""Hostile configuration and secrets: what check-config, run and pdoflow do.

A configuration that can never work is refused by ``check-config`` and by
``run`` with exit 78, naming its dotted key and never echoing a secret; a
password (with ``@ : / %``, spaces and quotes, from the DSN, the password
file or the systemd credential) never reaches a log line, a status text or
a CLI error; and a reload reads a rotated password file again. Everything
below the redaction unit tests drives the real ``pdoflowd`` and ``pdoflow``
commands as subprocesses against a real PostgreSQL.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devtools import devcluster
from harness import (
    REPO_ROOT,
    TESTS_DIR,
    Daemon,
    create_effects_table,
    daemon_config,
    wait_until,
    write_config,
)
from pdoflowd.client import Client
from pdoflowd.db.migrate import Grants, apply_grants, upgrade
from pdoflowd.redaction import MASK, dsn_secrets, redact
from pdoflowd.status import PostingStatus

# Passwords with every character that has a meaning in a URI or in a
# key=value string, and the one the issue was found with.
HOSTILE_PASSWORDS = [
    "Correct-Horse@127.0.0.1",
    "p@ss:w/rd%41 x'y\"z",
    "a:b@c/d",
    "100%@ok",
    "with space",
    "it's",
    'say "hi"',
    "%2F%40",
]


def unique(password: str) -> str:
    """The password made unique, so a stray match cannot pass a test."""
    return f"{password}-{uuid.uuid4().hex[:8]}"


def lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


def encodings(secret: str) -> list[str]:
    upper = quote(secret, safe="")
    return [secret, upper, lower_hex(upper)]


def assert_hidden(text: str, secret: str) -> None:
    for spelling in encodings(secret):
        assert spelling not in text, f"{spelling!r} shown in:\n{text}"


# ------------------------------------------------------------ redaction


@pytest.mark.parametrize("password", HOSTILE_PASSWORDS)
def test_a_uri_password_is_hidden_as_written_and_percent_encoded(
    password: str,
) -> None:
    secret = unique(password)
    dsn = f"postgresql://alice:{quote(secret, safe='')}@db1:5432/jobs"
    text = f"cannot use {dsn}: refused; the password was {secret}"

    shown = redact(text, dsn_secrets(dsn))

    assert_hidden(shown, secret)
    assert "postgresql://alice:***@db1:5432/jobs" in shown


@pytest.mark.parametrize("password", HOSTILE_PASSWORDS)
def test_a_uri_password_written_unencoded_is_hidden_whole(
    password: str,
) -> None:
    secret = unique(password)
    dsn = f"postgresql://alice:{secret}@db1/jobs"

    shown = redact(f"could not reach {dsn} (retrying)", dsn_secrets(dsn))

    assert_hidden(shown, secret)
    for piece in secret.replace("@", " ").replace("/", " ").split():
        if len(piece) > 3:
            assert piece not in shown


@pytest.mark.parametrize("password", HOSTILE_PASSWORDS)
def test_a_key_value_password_is_hidden_even_when_not_known(
    password: str,
) -> None:
    secret = unique(password)
    dsn = make_conninfo("host=db1 dbname=jobs", password=secret)
    assert conninfo_to_dict(dsn)["password"] == secret

    assert_hidden(redact(f"connecting with {dsn} failed"), secret)
    assert_hidden(redact(f"failed: {dsn}", dsn_secrets(dsn)), secret)


@pytest.mark.parametrize("password", HOSTILE_PASSWORDS)
def test_a_password_known_from_a_file_is_hidden_in_any_spelling(
    password: str,
) -> None:
    secret = unique(password)
    text = (
        f"role said {secret}; as a URI postgresql://u:"
        f"{quote(secret, safe='')}@h/d; lower "
        f"{lower_hex(quote(secret, safe=''))}; minimal "
        f"{quote(secret, safe=chr(39) + ':')}"
    )

    shown = redact(text, [secret])

    assert_hidden(shown, secret)
    assert quote(secret, safe=chr(39) + ":") not in shown


def test_the_host_libpq_makes_of_a_split_password_is_hidden() -> None:
    # What run logged on every retry before such a DSN was refused.
    text = (
        "database unreachable, retrying in 0.5 s: failed to resolve host "
        "'Correct-Horse@127.0.0.1': [Errno -2] Name or service not known"
    )

    shown = redact(text)

    assert "Correct-Horse" not in shown
    assert "'***@127.0.0.1'" in shown


def test_a_real_psycopg_error_of_a_split_password_is_hidden() -> None:
    dsn = "postgresql://u:p@Correct-Horse@127.0.0.1:1/db"
    with pytest.raises(psycopg.Error) as caught:
        psycopg.connect(dsn, connect_timeout=2)
    assert "Correct-Horse" in str(caught.value)  # what there is to hide

    assert "Correct-Horse" not in redact(str(caught.value), dsn_secrets(dsn))
    assert "Correct-Horse" not in redact(str(caught.value))


@pytest.mark.parametrize(
    "message",
    [
        'invalid integer value "secretpiece" for connection option "port"',
        'connection is bad: invalid port number: "secretpiece"',
        'connection is bad: invalid sslmode value: "secretpiece"',
        'invalid "ssl_min_protocol_version" value: "secretpiece"',
        'could not translate host name "secretpiece@db1" to address',
        'could not parse network address "secretpiece@10.0.0.1"',
    ],
)
def test_a_value_libpq_quotes_is_hidden(message: str) -> None:
    # In a URI split by an unencoded character, any value libpq quotes
    # may be a piece of the password.
    shown = redact(message)

    assert "secretpiece" not in shown
    assert MASK in shown


def test_text_without_secrets_is_left_alone() -> None:
    text = "worker 12 (slot 0) exited; postgresql://alice@db1/jobs is up"

    assert redact(text, ["unrelated-secret"]) == text


# ------------------------------------------------------------ commands


def command(
    program: str, *args: str, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k not in ("PDOFLOW_DSN",)
    }
    environ["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)])
    environ.pop("NOTIFY_SOCKET", None)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", program, *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=kw.pop("timeout", 60),
        **kw,
    )


def check_config(
    path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return command("pdoflowd", "check-config", "--config", str(path), env=env)


def config_file(tmp_path: Path, **overrides: Any) -> Path:
    sections = daemon_config("dbname=jobs", **overrides)
    return write_config(tmp_path / "pdoflowd.toml", sections)


HOSTILE_DSNS = [
    "postgresql://u:p@{secret}@127.0.0.1/db",
    "postgresql://u:pa/{secret}@127.0.0.1/db",
    "host=127.0.0.1 password={secret} sslmode=bogus",
    "host=127.0.0.1 password={secret} port=notaport",
    "host=127.0.0.1 password={secret} target_session_attrs=whatever",
    "host=127.0.0.1,127.0.0.2 port=5432,x{secret}",
    "postgresql://u:{secret}@127.0.0.1/db?load_balance_hosts=sometimes",
    "host=127.0.0.1 gssencmode={secret}",
    "host=127.0.0.1 channel_binding={secret}",
]


@pytest.mark.parametrize("template", HOSTILE_DSNS)
@pytest.mark.parametrize("key", ["dsn", "listen_dsn"])
def test_check_config_refuses_a_dsn_that_cannot_connect(
    tmp_path: Path, template: str, key: str
) -> None:
    secret = unique("Correct-Horse")
    path = config_file(tmp_path, database={key: template.format(secret=secret)})

    result = check_config(path)

    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith(f"database.{key}: "), result.stderr
    assert_hidden(result.stdout + result.stderr, secret)


def test_check_config_refuses_a_metrics_address_not_of_this_host(
    tmp_path: Path,
) -> None:
    path = config_file(tmp_path, metrics={"listen": "192.0.2.1:9464"})

    result = check_config(path)

    assert result.returncode == 78
    assert result.stderr.startswith("metrics.listen: ")
    assert "not an address of this host" in result.stderr


def test_check_config_refuses_a_metrics_host_name_that_does_not_exist(
    tmp_path: Path,
) -> None:
    try:
        socket.getaddrinfo("pdoflowd-test.invalid", 9464)
    except socket.gaierror as exc:
        if exc.errno != socket.EAI_NONAME:
            pytest.skip(f"the resolver does not answer here: {exc}")
    else:
        pytest.skip("the resolver answers for .invalid names here")
    path = config_file(
        tmp_path, metrics={"listen": "pdoflowd-test.invalid:9464"}
    )

    result = check_config(path)

    assert result.returncode == 78
    assert result.stderr.startswith("metrics.listen: cannot resolve")


def test_check_config_accepts_a_metrics_port_in_use(tmp_path: Path) -> None:
    # During a reload, the running daemon holds the port being checked.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = config_file(tmp_path, metrics={"listen": f"127.0.0.1:{port}"})

        result = check_config(path)

    assert result.returncode == 0, result.stderr


def test_check_config_refuses_a_retry_delay_a_worker_cannot_add(
    tmp_path: Path,
) -> None:
    path = config_file(
        tmp_path, jobs={"retry_delay_s": 1e12, "retry_delay_max_s": 1e12}
    )

    result = check_config(path)

    assert result.returncode == 78
    assert "jobs.retry_delay_s: must be between 0 and 2592000" in (
        result.stderr
    )


def test_check_config_names_a_duplicate_key_without_its_values(
    tmp_path: Path,
) -> None:
    first, second = unique("first@secret"), unique("second@secret")
    path = tmp_path / "pdoflowd.toml"
    path.write_text(
        "[database]\n"
        f'dsn = "postgresql://u:{quote(first, safe="")}@127.0.0.1/db"\n'
        'password_file = ""\n'
        f'dsn = "postgresql://u:{quote(second, safe="")}@127.0.0.1/db"\n'
    )

    result = check_config(path)

    assert result.returncode == 78
    assert result.stderr.startswith("database.dsn: defined twice")
    assert "line 4" in result.stderr
    assert_hidden(result.stderr, first)
    assert_hidden(result.stderr, second)


def run_daemon(
    path: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return command(
        "pdoflowd", "run", "--config", str(path), env=env, timeout=timeout
    )


def test_run_refuses_a_split_uri_password_at_once(tmp_path: Path) -> None:
    # It used to start and log "failed to resolve host 'Correct-Horse@..."
    # on every retry, forever.
    path = config_file(
        tmp_path,
        database={"dsn": "postgresql://u:p@Correct-Horse@127.0.0.1/db"},
    )

    result = run_daemon(path)

    assert result.returncode == 78
    assert result.stderr.startswith("database.dsn: ")
    assert "Correct-Horse" not in result.stdout + result.stderr


def test_run_exits_78_for_a_metrics_address_not_of_this_host(
    tmp_path: Path,
) -> None:
    path = config_file(tmp_path, metrics={"listen": "192.0.2.1:9464"})

    result = run_daemon(path)

    assert result.returncode == 78, result.stderr
    assert "metrics.listen" in result.stderr


def test_run_exits_78_for_a_tls_certificate_it_cannot_read(
    tmp_path: Path,
) -> None:
    path = config_file(
        tmp_path,
        metrics={
            "listen": "127.0.0.1:0",
            "tls_cert_file": str(tmp_path / "absent.pem"),
        },
    )

    result = run_daemon(path)

    assert result.returncode == 78, result.stderr
    assert "absent.pem" in result.stderr


def test_a_reload_refuses_a_metrics_address_not_of_this_host(
    daemons: Any,
) -> None:
    daemon = daemons()
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(
        text.replace('listen = ""', 'listen = "192.0.2.1:9464"')
    )

    daemon.send(signal.SIGHUP)

    daemon.wait_for_text("reload refused: metrics.listen")
    assert daemon.proc is not None and daemon.proc.poll() is None


# ------------------------------------------------------------ the password


def missing_database_dsn(dsn: str, name: str) -> str:
    """``dsn`` naming a database that does not exist: ``name``."""
    params = conninfo_to_dict(dsn)
    params["dbname"] = name
    return make_conninfo("", **params)


@pytest.mark.parametrize("source", ["password_file", "credential"])
@pytest.mark.parametrize("password", ["p@ss:w/rd%41 x'y\"z", "Correct-Horse"])
def test_run_never_logs_the_password_it_read(
    tmp_path: Path, dsn: str, source: str, password: str
) -> None:
    # The password doubles as the name of a database that does not exist,
    # so PostgreSQL's own error quotes it on every retry of the start.
    secret = unique(password)
    password_file = tmp_path / "db-password"
    password_file.write_text(secret + "\n")
    env: dict[str, str] = {}
    database: dict[str, Any] = {"dsn": missing_database_dsn(dsn, secret)}
    if source == "password_file":
        database["password_file"] = str(password_file)
    else:
        env["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    daemon = Daemon(tmp_path, daemon_config(dsn, database=database), env=env)
    try:
        daemon.start()
        wait_until(lambda: daemon.log().count("database unreachable") >= 2)
        status = daemon.wait_for_text("STATUS=")
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.close()

    log = daemon.log()
    assert "does not exist" in log  # PostgreSQL's error was logged
    assert_hidden(log, secret)
    assert_hidden("\n".join(daemon.messages) + status, secret)


def test_pdoflow_refuses_a_split_uri_password_without_echoing_it() -> None:
    dsn = "postgresql://u:p@Correct-Horse@127.0.0.1:1/db"

    result = command("pdoflowd.cli", "--dsn", dsn, "status", str(uuid.uuid4()))

    assert result.returncode == 64, result.stderr
    assert "percent-encoded" in result.stderr
    assert "Correct-Horse" not in result.stdout + result.stderr


@pytest.mark.parametrize("template", HOSTILE_DSNS)
def test_pdoflow_refuses_a_dsn_that_cannot_connect(template: str) -> None:
    secret = unique("Correct-Horse")
    dsn = template.format(secret=secret)

    result = command("pdoflowd.cli", "--dsn", dsn, "status", str(uuid.uuid4()))

    assert result.returncode == 64, result.stderr
    assert result.stderr.startswith("pdoflow: --dsn: ")
    assert_hidden(result.stdout + result.stderr, secret)


@pytest.mark.parametrize("password", HOSTILE_PASSWORDS)
def test_pdoflow_never_prints_the_password_postgresql_quotes(
    dsn: str, password: str
) -> None:
    secret = unique(password)

    result = command(
        "pdoflowd.cli",
        "--dsn",
        missing_database_dsn(dsn, secret),
        "status",
        str(uuid.uuid4()),
        env={"PGPASSWORD": secret},
    )

    assert result.returncode == 69, result.stderr
    assert "does not exist" in result.stderr
    assert_hidden(result.stdout + result.stderr, secret)


# ------------------------------------------------------------ a reload


@pytest.fixture(scope="module")
def scram_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[devcluster.LocalCluster]:
    """A PostgreSQL that demands a password of every role but postgres."""
    try:
        cluster = devcluster.LocalCluster(tmp_path_factory.mktemp("scram"))
    except RuntimeError as error:
        pytest.skip(f"NO LOCAL POSTGRESQL: password tests NOT run: {error}")
    cluster.init()
    (cluster.data_dir / "pg_hba.conf").write_text(
        "local all postgres trust\n"
        "host all postgres 127.0.0.1/32 trust\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop("immediate")


def set_password(admin_dsn: str, role: str, password: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )


@pytest.fixture
def password_database(
    scram_cluster: devcluster.LocalCluster,
) -> tuple[str, str, str]:
    """(admin dsn, daemon dsn without a password, daemon role) of a fresh
    migrated database; the role has the daemon grants and no password."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    role = f"daemon_{uuid.uuid4().hex[:8]}"
    admin = scram_cluster.create_database(name)
    upgrade(admin)
    create_effects_table(admin)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role))
        )
        apply_grants(conn, Grants(daemons=[role]))
    daemon_dsn = make_conninfo(admin, user=role)
    return admin, daemon_dsn, role


def sessions_of(admin: str, role: str, since: float = 0.0) -> int:
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
            " AND backend_start >= to_timestamp(%s)",
            (role, since),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_reload_logs_in_with_the_rotated_password_file(
    tmp_path: Path, password_database: tuple[str, str, str]
) -> None:
    admin, daemon_dsn, role = password_database
    old, new = unique("old@pw:/%' x"), unique('new@pw:/%" y')
    set_password(admin, role, old)
    password_file = tmp_path / "db-password"
    password_file.write_text(old + "\n")
    daemon = Daemon(
        tmp_path,
        daemon_config(
            daemon_dsn, database={"password_file": str(password_file)}
        ),
        effects_dsn=admin,
    )
    daemon.env.pop("CREDENTIALS_DIRECTORY", None)
    daemon.env["PGPASSFILE"] = str(tmp_path / "no-pgpass")
    try:
        daemon.start().wait_ready()
        before = set(daemon.workers())

        set_password(admin, role, new)
        password_file.write_text(new + "\n")
        daemon.send(signal.SIGHUP)

        # Every worker is replaced by one that logged in with the new
        # password (with the old one, none would ever be ready).
        wait_until(
            lambda: (
                len(daemon.workers()) == 2
                and not before & set(daemon.workers())
                and "rolling" in daemon.log()
            ),
            timeout=60,
        )
        client = Client(admin)
        posting = client.post("jobfns.record", [["after-reload"]])
        state = client.wait(posting.id, timeout=60, poll_interval=0.05)
        assert state.status is PostingStatus.FINISHED

        # The supervisor's own session reconnects with it too: end every
        # session of the role and see all three come back.
        cut = time.time()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE usename = %s",
                (role,),
            )
        wait_until(lambda: sessions_of(admin, role, cut) >= 3, timeout=60)
        heartbeat = time.time()
        with psycopg.connect(admin) as conn:
            wait_until(
                lambda: (
                    conn.execute(
                        "SELECT max(heartbeat_at) > to_timestamp(%s)"
                        " FROM pdoflowd.daemons",
                        (heartbeat,),
                    ).fetchone()
                    == (True,)
                ),
                timeout=30,
            )
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.close()

    log = daemon.log()
    assert "password authentication failed" not in log
    assert_hidden(log, old)
    assert_hidden(log, new)


def test_a_reload_with_an_unreadable_password_file_is_refused(
    tmp_path: Path, password_database: tuple[str, str, str]
) -> None:
    admin, daemon_dsn, role = password_database
    secret = unique("pw@x")
    set_password(admin, role, secret)
    password_file = tmp_path / "db-password"
    password_file.write_text(secret + "\n")
    daemon = Daemon(
        tmp_path,
        daemon_config(
            daemon_dsn, database={"password_file": str(password_file)}
        ),
        effects_dsn=admin,
    )
    daemon.env.pop("CREDENTIALS_DIRECTORY", None)
    try:
        daemon.start().wait_ready()
        workers = set(daemon.workers())
        password_file.write_text("\n")

        daemon.send(signal.SIGHUP)

        status = daemon.wait_for_text("reload refused: database.password_file")
        assert "first line is empty" in status
        assert set(daemon.workers()) == workers
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.close()
    assert_hidden(daemon.log(), secret)
