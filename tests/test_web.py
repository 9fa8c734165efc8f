"""The web console, ``pdoflowd web``: every page and action over real HTTP,
against a real database and a real daemon running the jobs.

One database, one daemon and one console for the module (the console
with a users file, an admin and a viewer, and actions allowed); tests
that need another console start their own.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.devcluster import free_port
from devtools.webproc import WebProcess
from harness import Daemon, create_effects_table, daemon_config, grant
from pdoflowd.client import Client
from pdoflowd.db import shared

ADMIN = ("ada", "ada-secret")
VIEWER = ("vic", "vic-secret")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def add_user(config: Path, name: str, password: str, *, admin: bool) -> None:
    """``pdoflowd web --add-user`` in this process (a subprocess costs
    seconds here; the command line itself is run as one below)."""
    import contextlib
    import io
    import sys

    from pdoflowd.daemon.command import main

    args = ["web", "--config", str(config), "--add-user", name]
    saved = sys.stdin
    sys.stdin = io.StringIO(password + "\n")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*args, *(["--admin"] if admin else [])]) == 0
    finally:
        sys.stdin = saved


def _pdoflowd() -> list[str]:
    from devtools.daemonproc import pdoflowd_command

    return pdoflowd_command()


def web_sections(database_dsn: str, tmp: Path, **web: Any) -> dict[str, Any]:
    return {
        "database": {"dsn": database_dsn},
        "web": {"listen": f"127.0.0.1:{free_port()}", "refresh_s": 0.5, **web},
    }


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="module")
def module_dsn(pg_server: Any, pdoflowd_template: str) -> Iterator[str]:
    name = f"t_web_{uuid.uuid4().hex[:10]}"
    dsn = pg_server.create_database(name, template=pdoflowd_template)
    create_effects_table(dsn)
    try:
        yield dsn
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="module")
def daemon(module_dsn: str, tmp_module: Path) -> Iterator[Daemon]:
    # Every job profiled, for the posting page's profile section.
    jobs = {"allowed_modules": ["jobfns", "featurejobs"]}
    config = daemon_config(module_dsn, jobs={**jobs, "profile_sample_rate": 1})
    running = Daemon(tmp_module, config, effects_dsn=module_dsn)
    running.start().wait_ready()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def web(module_dsn: str, tmp_module: Path) -> Iterator[WebProcess]:
    users = tmp_module / "users"
    sections = web_sections(
        module_dsn, tmp_module, users_file=str(users), allow_actions=True
    )
    console = WebProcess(tmp_module, sections)
    add_user(console.config_path, *ADMIN, admin=True)
    add_user(console.config_path, *VIEWER, admin=False)
    console.start()
    try:
        yield console
    finally:
        console.stop()


@pytest.fixture(scope="module")
def client(module_dsn: str) -> Client:
    return Client(module_dsn)


@pytest.fixture(scope="module")
def finished(client: Client, daemon: Daemon) -> uuid.UUID:
    """A finished posting of 55 jobs, with its results kept and a shared
    variable."""
    args = [[i] for i in range(55)]
    ok = client.post("jobfns.noop", args, store_result=True, tries=1)
    client.wait(ok.id, timeout=60)
    with client.connect() as conn:
        shared.shared_set(conn, ok.id, "threshold", "0.5")
    return ok.id


@pytest.fixture(scope="module")
def failed(client: Client, daemon: Daemon) -> uuid.UUID:
    posting = client.post(
        "jobfns.fail", [["boom"]] * 3 + [["bang"]] * 2, tries=1
    )
    client.wait(posting.id, timeout=60)
    return posting.id


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert match, page
    return match[1]


def act(
    web: WebProcess,
    kind: str,
    ident: uuid.UUID,
    action: str,
    *,
    auth: tuple[str, str] = ADMIN,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    if token is None:
        confirm = web.get(
            f"/{kind}s/{ident}/confirm?action={action}", auth=auth
        )
        assert confirm.status == 200, confirm
        token = csrf_of(confirm.text)
    body = urllib.parse.urlencode({"action": action, "csrf": token}).encode()
    return web.request(
        "POST",
        f"/{kind}s/{ident}/action",
        auth=auth,
        data=body,
        headers={**FORM, **(headers or {})},
    )


# ------------------------------------------------------------ login


def test_pages_need_a_login_when_a_users_file_is_set(web: WebProcess) -> None:
    answer = web.get("/")
    assert answer.status == 401
    assert answer.headers["www-authenticate"].startswith("Basic")
    assert web.get("/", auth=("ada", "wrong")).status == 401
    assert web.get("/", auth=("nobody", "x")).status == 401


def test_a_viewer_reads_every_page(
    web: WebProcess, finished: uuid.UUID
) -> None:
    for path in ("/", "/postings", f"/postings/{finished}"):
        answer = web.get(path, auth=VIEWER)
        assert answer.status == 200, (path, answer)
        assert "vic" in answer.text


# ------------------------------------------------------------ overview


def test_overview_shows_the_queue_daemons_and_throughput(
    web: WebProcess, daemon: Daemon, finished: uuid.UUID, failed: uuid.UUID
) -> None:
    page = web.get("/", auth=VIEWER)
    assert page.status == 200
    queue = page.text.split('id="queue"')[1].split("</table>")[0]
    # priority 0: waiting, executing, done, errored_out
    assert re.search(r"<td>0</td>\s*<td[^>]*>0</td><td[^>]*>0</td>", queue)
    assert '<th class="n">55</th>' in queue
    daemons = page.text.split('id="daemons"')[1].split("</table>")[0]
    assert f">{daemon.pid}<" in daemons
    assert daemons.count("<li>idle</li>") == 2
    done_hour = re.search(r'id="done-hour">(\d+)<', page.text)
    errored_hour = re.search(r'id="errored-hour">(\d+)<', page.text)
    assert done_hour and int(done_hour[1]) >= 55
    assert errored_hour and int(errored_hour[1]) >= 5
    assert page.text.count('class="done"') >= 1


def test_overview_names_a_busy_worker_and_the_oldest_waiting_job(
    web: WebProcess, client: Client, daemon: Daemon
) -> None:
    busy = client.post("jobfns.sleep", [[3.0]], tries=1)
    waiting = client.post("jobfns.noop", [[1]], paused=True)
    try:
        deadline = time.monotonic() + 10
        while "busy: 1 job of jobfns.sleep" not in (
            page := web.get("/", auth=VIEWER).text
        ):
            assert time.monotonic() < deadline, page
            time.sleep(0.2)
        assert "none waiting" in page
    finally:
        client.cancel(busy.id)
        client.cancel(waiting.id)


# ------------------------------------------------------------ postings


def test_postings_list_filters_and_searches(
    web: WebProcess, client: Client, finished: uuid.UUID, failed: uuid.UUID
) -> None:
    every = web.get("/postings", auth=VIEWER).text
    assert str(finished) in every and str(failed) in every
    held = client.post("jobfns.noop", [[1]], paused=True)
    paused = web.get("/postings?status=paused", auth=VIEWER).text
    client.cancel(held.id)
    assert str(held.id) in paused and str(finished) not in paused
    by_target = web.get("/postings?target=noop", auth=VIEWER).text
    assert str(finished) in by_target and str(failed) not in by_target
    by_id = web.get(f"/postings?q={str(failed)[:13]}", auth=VIEWER).text
    assert str(failed) in by_id and str(finished) not in by_id
    nobody = web.get("/postings?poster=nobody", auth=VIEWER).text
    assert "No posting matches." in nobody
    recent = web.get("/postings?age=1h", auth=VIEWER).text
    assert str(finished) in recent
    assert '<progress max="100" value="100.0"' in every


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=done", "status must be one of"),
        ("page=0", "page must be a whole number"),
        ("page=abc", "page must be a whole number"),
        ("age=soon", "age must be a positive number"),
        ("age=0", "age must be a positive number"),
        ("colour=red", "unknown parameter 'colour'"),
        ("target=" + "x" * 201, "target is longer than"),
        ("q=%01", "search holds control characters"),
    ],
)
def test_postings_list_answers_bad_filters_with_400(
    web: WebProcess, query: str, message: str
) -> None:
    answer = web.get(f"/postings?{query}", auth=VIEWER)
    assert answer.status == 400
    assert message in answer.text
    assert "Traceback" not in answer.text


def test_a_posting_page_shows_jobs_paged_and_filtered(
    web: WebProcess, finished: uuid.UUID
) -> None:
    first = web.get(f"/postings/{finished}", auth=VIEWER)
    assert first.status == 200
    assert first.text.count('href="/jobs/') == 50
    assert "page 1 of 2" in first.text
    second = web.get(f"/postings/{finished}?page=2", auth=VIEWER).text
    assert second.count('href="/jobs/') == 5
    done = web.get(f"/postings/{finished}?status=errored_out", auth=VIEWER)
    assert "No jobs here." in done.text
    assert "threshold" in first.text and "0.5" in first.text
    assert "Not posted by a schedule." in first.text
    assert 'id="dependencies"' in first.text


def test_a_posting_page_groups_failures_by_type_and_message(
    web: WebProcess, failed: uuid.UUID
) -> None:
    page = web.get(f"/postings/{failed}", auth=VIEWER).text
    failures = page.split('id="failures"')[1].split("</table>")[0]
    rows = re.findall(
        r"<tr><td>(\w+)</td><td class=\"error\">(\w+)</td>"
        r"<td class=\"n\">(\d+)</td>",
        failures,
    )
    assert rows == [
        ("RuntimeError", "boom", "3"),
        ("RuntimeError", "bang", "2"),
    ]


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/postings/not-a-uuid", 400, "is not a UUID"),
        (f"/postings/{uuid.UUID(int=1)}", 404, "no posting"),
        ("/postings/{finished}?page=9", 400, "past the last page"),
        ("/postings/{finished}?status=gone", 400, "status must be one of"),
        ("/jobs/12", 400, "is not a UUID"),
        (f"/jobs/{uuid.UUID(int=1)}", 404, "no job"),
        ("/nowhere", 404, "no page"),
    ],
)
def test_bad_ids_and_pages_get_a_message_not_a_traceback(
    web: WebProcess, finished: uuid.UUID, path: str, status: int, message: str
) -> None:
    answer = web.get(
        path.format(finished=finished),
        auth=VIEWER,
        headers={"Accept": "text/html"},
    )
    assert answer.status == status
    assert message in answer.text
    assert "Traceback" not in answer.text


def test_results_download_as_json_lines(
    web: WebProcess, finished: uuid.UUID
) -> None:
    answer = web.get(f"/postings/{finished}/results.jsonl", auth=VIEWER)
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in answer.headers["content-disposition"]
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert len(lines) == 55
    assert {line["status"] for line in lines} == {"done"}
    assert all(line["stored"] for line in lines)


def test_a_job_page_shows_arguments_error_traceback_timings_and_host(
    web: WebProcess, client: Client, failed: uuid.UUID, daemon: Daemon
) -> None:
    job = client.jobs(failed)[0]
    page = web.get(f"/jobs/{job.uuid}", auth=VIEWER).text
    posargs = page.split('id="posargs"')[1].split("</pre>")[0]
    assert '"boom"' in html.unescape(posargs)
    assert "RuntimeError: boom" in page
    assert 'id="traceback"' in page and "raise RuntimeError" in page
    for timing in ("Queued", "Claimed", "Started", "Finished"):
        assert f"<dt>{timing}</dt><dd>20" in page, timing
    assert f"daemon pid {daemon.pid}" in page


def test_a_job_page_shows_each_attempts_output(
    web: WebProcess, client: Client
) -> None:
    posting = client.post("featurejobs.print_lines", [[3, "to stderr"]])
    client.wait(posting.id, timeout=60)
    page = web.get(f"/jobs/{posting.job_ids[0]}", auth=VIEWER).text
    output = page.split('<pre class="output">')[1].split("</pre>")[0]
    assert "line 0000000" in output and "line 0000002" in output
    assert "to stderr" in output
    assert "Attempt 1" in page


def test_a_posting_page_shows_the_profile_of_its_sampled_jobs(
    web: WebProcess, finished: uuid.UUID
) -> None:
    page = web.get(f"/postings/{finished}", auth=VIEWER).text
    assert 'id="profile"' in page
    profile = page.split('id="profile"')[1].split("</table>")[0]
    assert "<td>noop</td>" in profile
    assert "jobfns.py:" in profile


# ------------------------------------------------------------ live


def test_progress_streams_as_server_sent_events(
    web: WebProcess, client: Client, daemon: Daemon
) -> None:
    import urllib.request

    from devtools.webproc import basic_header

    posting = client.post("jobfns.sleep", [[0.3]] * 6, tries=1)
    request = urllib.request.Request(
        f"{web.url}/events?posting={posting.id}",
        headers={"Authorization": basic_header(*VIEWER)},
    )
    seen: list[dict[str, Any]] = []
    with urllib.request.urlopen(request, timeout=30) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        event = ""
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "progress":
                seen.append(json.loads(line[6:])[str(posting.id)])
            elif event == "end":
                break
    assert seen[-1]["status"] == "finished"
    assert seen[-1]["percent"] == 100.0
    assert len(seen) >= 2
    assert seen[0]["percent"] < 100.0


def test_the_event_stream_checks_its_postings(web: WebProcess) -> None:
    assert web.get("/events", auth=VIEWER).status == 400
    assert web.get("/events?posting=x", auth=VIEWER).status == 400
    assert web.get("/events?posting=x").status == 401


# ------------------------------------------------------------ actions


def test_an_admin_pauses_and_resumes_a_posting_and_it_is_logged(
    web: WebProcess, client: Client, daemon: Daemon
) -> None:
    posting = client.post("jobfns.sleep", [[0.1]] * 40, tries=1)
    paused = act(web, "posting", posting.id, "pause")
    assert paused.status == 303
    assert paused.headers["location"] == f"/postings/{posting.id}?did=pause"
    assert client.status(posting.id).status.value == "paused"
    page = web.get(f"/postings/{posting.id}?did=pause", auth=ADMIN).text
    assert "Posting paused." in page
    assert act(web, "posting", posting.id, "resume").status == 303
    assert client.wait(posting.id, timeout=60).status.value == "finished"
    log = web.log()
    assert f"user ada from 127.0.0.1: pause posting {posting.id}" in log
    assert f"user ada from 127.0.0.1: resume posting {posting.id}" in log


def test_an_admin_cancels_a_posting_and_retries_a_job(
    web: WebProcess, client: Client, failed: uuid.UUID
) -> None:
    job = client.jobs(failed)[0]
    assert act(web, "job", job.uuid, "retry").status == 303
    assert client.job(job.uuid).attempt >= 1
    paused = client.post("jobfns.noop", [[1]], paused=True)
    assert act(web, "posting", paused.id, "cancel").status == 303
    assert client.status(paused.id).status.value == "cancelled"
    again = act(web, "posting", paused.id, "pause")
    assert again.status == 409
    assert "cancelled" in again.text


def test_actions_refuse_viewers_forged_forms_and_other_sites(
    web: WebProcess, client: Client
) -> None:
    posting = client.post("jobfns.noop", [[1]], paused=True)
    try:
        viewer = web.get(
            f"/postings/{posting.id}/confirm?action=resume", auth=VIEWER
        )
        assert viewer.status == 403
        assert (
            act(
                web,
                "posting",
                posting.id,
                "resume",
                auth=VIEWER,
                token="0" * 64,
            ).status
            == 403
        )
        forged = act(web, "posting", posting.id, "resume", token="0" * 64)
        assert forged.status == 403
        assert "token" in forged.text
        elsewhere = act(
            web,
            "posting",
            posting.id,
            "resume",
            headers={"Origin": "http://evil.example"},
        )
        assert elsewhere.status == 403
        confirm = web.get(
            f"/postings/{posting.id}/confirm?action=resume", auth=ADMIN
        )
        bad = act(
            web, "posting", posting.id, "explode", token=csrf_of(confirm.text)
        )
        assert bad.status == 400
        assert client.status(posting.id).status.value == "paused"
    finally:
        client.cancel(posting.id)


def test_confirm_pages_check_the_action(web: WebProcess) -> None:
    answer = web.get(
        f"/postings/{uuid.UUID(int=1)}/confirm?action=delete", auth=ADMIN
    )
    assert answer.status == 400


# ------------------------------------------------------------ other consoles


def test_on_loopback_without_users_pages_are_open_but_actions_are_not(
    module_dsn: str, tmp_path: Path, client: Client, daemon: Daemon
) -> None:
    console = WebProcess(
        tmp_path, web_sections(module_dsn, tmp_path, allow_actions=True)
    ).start()
    try:
        posting = client.post("jobfns.noop", [[1]], paused=True)
        assert console.get("/").status == 200
        page = console.get(f"/postings/{posting.id}").text
        assert "anonymous" in page
        confirm = console.get(f"/postings/{posting.id}/confirm?action=resume")
        assert confirm.status == 403
        assert "admin user" in confirm.text
        client.cancel(posting.id)
    finally:
        console.stop()


def test_without_allow_actions_no_action_is_offered_or_done(
    web: WebProcess, module_dsn: str, tmp_path: Path, client: Client
) -> None:
    sections = web_sections(
        module_dsn, tmp_path, users_file=str(web.config_path.parent / "users")
    )
    console = WebProcess(tmp_path, sections, name="readonly").start()
    try:
        posting = client.post("jobfns.noop", [[1]], paused=True)
        page = console.get(f"/postings/{posting.id}", auth=ADMIN).text
        assert 'id="actions"' not in page
        answer = console.get(
            f"/postings/{posting.id}/confirm?action=resume", auth=ADMIN
        )
        assert answer.status == 403
        assert "web.allow_actions" in answer.text
        client.cancel(posting.id)
    finally:
        console.stop()


def test_a_submitter_role_sees_only_its_own_postings(
    module_dsn: str, tmp_path: Path, client: Client, finished: uuid.UUID
) -> None:
    role = f"web_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(module_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    grant(module_dsn, submitters=[role])
    mine = Client(_dsn_as(module_dsn, role)).post(
        "jobfns.noop", [[1]], paused=True
    )
    console = WebProcess(
        tmp_path,
        web_sections(module_dsn, tmp_path, dsn=_dsn_as(module_dsn, role)),
    ).start()
    try:
        listing = console.get("/postings").text
        assert str(mine.id) in listing
        assert str(finished) not in listing
        assert console.get(f"/postings/{finished}").status == 404
        overview = console.get("/")
        assert overview.status == 200
        assert "may not read" in overview.text or "Hidden" in overview.text
    finally:
        console.stop()
        with psycopg.connect(module_dsn, autocommit=True) as conn:
            conn.execute(
                "DELETE FROM pdoflowd.postings WHERE poster = %s", (role,)
            )
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def _dsn_as(dsn: str, role: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params["user"] = role
    params.pop("password", None)
    return make_conninfo(**params)


# ------------------------------------------------------------ the command


def test_it_refuses_to_listen_beyond_loopback_without_tls(
    tmp_path: Path, module_dsn: str
) -> None:
    from devtools.daemonproc import write_config

    config = write_config(
        tmp_path / "open.toml",
        {"database": {"dsn": module_dsn}, "web": {"listen": "0.0.0.0:9465"}},
    )
    result = subprocess.run(
        [*_pdoflowd(), "web", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78
    assert "web.listen: '0.0.0.0:9465' is beyond loopback" in result.stderr
    assert "web.users_file: needed beyond loopback" in result.stderr


def test_add_user_writes_salted_hashes_and_usage_errors_exit_64(
    tmp_path: Path, module_dsn: str
) -> None:
    from devtools.daemonproc import write_config

    users = tmp_path / "users"
    config = write_config(
        tmp_path / "u.toml",
        {"database": {"dsn": module_dsn}, "web": {"users_file": str(users)}},
    )
    add_user(config, "ann", "same", admin=True)
    add_user(config, "bob", "same", admin=False)
    lines = users.read_text().splitlines()
    assert [line.split(":")[:2] for line in lines] == [
        ["ann", "admin"],
        ["bob", "viewer"],
    ]
    assert lines[0].split(":")[2] != lines[1].split(":")[2]
    assert "same" not in users.read_text()
    assert users.stat().st_mode & 0o777 == 0o640
    from pdoflowd.daemon.command import main

    assert main(["web", "--config", str(config), "--admin"]) == 64
    empty = subprocess.run(
        [*_pdoflowd(), "web", "--config", str(config), "--add-user", "eve"],
        input="\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert empty.returncode == 64
    assert "password is empty" in empty.stderr


def test_tls_with_client_certificates_admits_only_the_cas_clients(
    module_dsn: str, tmp_path: Path
) -> None:
    import ssl
    import urllib.error

    from test_metrics import _pki_with_cryptography, client_context

    pytest.importorskip("cryptography")
    pki = _pki_with_cryptography(tmp_path)
    sections = web_sections(
        module_dsn,
        tmp_path,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.client_ca),
    )
    listen = sections["web"]["listen"]
    console = WebProcess(
        tmp_path, sections, tls=client_context(pki, pki.client_cert)
    ).start()
    try:
        assert console.url.startswith("https://")
        page = console.get("/")
        assert page.status == 200
        assert "client-certificate" in page.text
        for context in (
            client_context(pki),
            client_context(pki, pki.stranger_cert),
        ):
            opener = urllib.request.build_opener(
                urllib.request.HTTPSHandler(context=context)
            )
            with pytest.raises((urllib.error.URLError, ssl.SSLError, OSError)):
                opener.open(f"https://{listen}/", timeout=10).read()
        with pytest.raises((urllib.error.URLError, OSError)):
            urllib.request.urlopen(f"http://{listen}/", timeout=10).read()
    finally:
        console.stop()


def test_sigterm_stops_the_console_at_once_with_a_stream_open(
    module_dsn: str, tmp_path: Path, client: Client
) -> None:
    import threading

    console = WebProcess(tmp_path, web_sections(module_dsn, tmp_path)).start()
    posting = client.post("jobfns.noop", [[1]], paused=True)
    opened = threading.Event()

    def follow() -> None:
        url = f"{console.url}/events?posting={posting.id}"
        try:
            with urllib.request.urlopen(url, timeout=30) as stream:
                stream.readline()
                opened.set()
                stream.read()
        except OSError:
            pass

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        assert opened.wait(10)
        assert console.proc is not None
        started = time.monotonic()
        console.proc.terminate()
        console.proc.wait(20)
        took = time.monotonic() - started
        assert took < 5, took
    finally:
        console.stop()
        client.cancel(posting.id)
        reader.join(5)


def test_a_posting_page_shows_what_it_waits_for_and_what_waits_for_it(
    web: WebProcess, client: Client
) -> None:
    upstream = client.post("jobfns.noop", [[1]], paused=True)
    downstream = client.post("jobfns.noop", [[2]], after=[upstream])
    try:
        page = web.get(f"/postings/{downstream.id}", auth=VIEWER)
        assert page.status == 200
        section = page.text.split('id="dependencies"')[1].split("</section>")[0]
        assert f'href="/postings/{upstream.id}"' in section
        assert "not ended yet" in section
        assert "held (1)" in page.text
        page = web.get(f"/postings/{upstream.id}", auth=VIEWER)
        section = page.text.split('id="dependencies"')[1].split("</section>")[0]
        assert "Waited for by" in section
        assert f'href="/postings/{downstream.id}"' in section
        client.cancel(upstream.id)
        page = web.get(f"/postings/{downstream.id}", auth=VIEWER)
        assert f"Cancelled: upstream posting {upstream.id} cancelled" in (
            page.text
        )
    finally:
        for posting in (upstream, downstream):
            if not client.status(posting.id).status.is_final:
                client.cancel(posting.id)
