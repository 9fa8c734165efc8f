"""The real daemon's metrics endpoint against hostile clients.

A client that sends garbage gets a 4xx answer and costs the journal at most
a line now and then, never a traceback. A client that keeps the
connection slots full (connecting in a loop, sending nothing, half a
request, or a whole one and then never closing; over TLS, never starting
the handshake) cannot keep /livez and /readyz from answering within a
second. Everything goes over real sockets on 127.0.0.1 to a daemon started
as a subprocess; the flooding client is a process of its own, so it does
not share the test's interpreter lock with the probes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import selectors
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_metrics import ServedLoop

from devtools.devcluster import free_port
from harness import Daemon, daemon_config, wait_until
from pdoflowd.daemon.httpserver import HttpServer, Limits, Response

SLOTS = 32  # httpserver.Limits().max_connections
# Connections the flood keeps open: the slots, and more than the 64 a
# listen queue often holds.
HOLD = 4 * SLOTS
ANSWER_BOUND_S = 1.0

MALFORMED = [
    # (what the client sends, the statuses it may get)
    (b"GET http://[x/metrics HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    (b"GET http://[::1/metrics HTTP/1.1\r\n\r\n", {400}),
    (b"GET http://[nothex]:80/livez HTTP/1.1\r\n\r\n", {400}),
    (b"\xff\xfe\x00\x01garbage\x80\r\n\r\n", {400}),
    (b"GET /m\xc3\xa9trics HTTP/1.1\r\n\r\n", {400}),
    (b"GET /livez\x1b[31m HTTP/1.1\r\n\r\n", {400}),
    (b"GET /li\x00vez HTTP/1.1\r\n\r\n", {400}),
    (b"\r\n\r\n", {400}),
    (b"\n\n", {400}),
    (b"GET /\r\n\r\n", {400}),
    (b"GET\r\n\r\n", {400}),
    (b"GET /livez HTTP/1.1 extra\r\n\r\n", {400}),
    (b"GET  /livez HTTP/1.1\r\n\r\n", {400}),
    (b"GET /livez HTTP/x.y\r\n\r\n", {400}),
    (b"GET livez HTTP/1.1\r\n\r\n", {400}),
    (b"GET ftp://x/livez HTTP/1.1\r\n\r\n", {400}),
    (b"GET /livez HTTP/9.9\r\n\r\n", {400, 505}),
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", {414}),
    (b"GET /livez HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", {431}),
]


# ------------------------------------------------------------ the daemon


def start_daemon(
    tmp_path: Path, dsn: str, **metrics: object
) -> tuple[Daemon, int]:
    port = free_port()
    daemon = Daemon(
        tmp_path,
        daemon_config(
            dsn,
            workers={"count": 1},
            metrics={"listen": f"127.0.0.1:{port}", **metrics},
        ),
    )
    daemon.start().wait_ready()
    return daemon, port


@pytest.fixture
def daemon_and_port(tmp_path: Path, dsn: str) -> Iterator[tuple[Daemon, int]]:
    daemon, port = start_daemon(tmp_path, dsn)
    try:
        yield daemon, port
    finally:
        daemon.close()


# ------------------------------------------------------------ clients


def exchange(
    port: int,
    payload: bytes,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> bytes:
    """Send ``payload`` on a new connection; everything read until EOF."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        sock: socket.socket = raw
        if context is not None:
            sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        # Refused before it was all sent: the answer may be there still.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        chunks = []
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    line = answer.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1.1 "), answer[:200]
    return int(line.split(b" ")[1])


def probe(
    port: int, path: str, context: ssl.SSLContext | None = None
) -> tuple[int | None, float]:
    """One GET on a new connection: its status (None: none within the
    bound) and how long it took, connect included."""
    began = time.monotonic()
    try:
        answer = exchange(
            port,
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
            context=context,
            timeout=ANSWER_BOUND_S,
        )
    except (OSError, ssl.SSLError):
        return None, time.monotonic() - began
    elapsed = time.monotonic() - began
    if not answer.startswith(b"HTTP/1.1 "):
        return None, elapsed
    return status_of(answer), elapsed


# A client that keeps ``hold`` connections to the endpoint open for
# ``seconds`` and opens a new one whenever the server closes one. Each
# connection follows one of ``modes`` in turn: ``idle`` sends nothing,
# ``partial`` half a request, ``complete`` a whole one whose answer it
# reads and then keeps the connection open without ever closing it,
# ``hello`` the first bytes of a TLS ClientHello. It prints what it did.
FLOOD = r"""
import collections, errno, json, selectors, socket, sys, time

port, hold, seconds, modes = (
    int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
    sys.argv[4].split(","),
)
max_connects = 200_000
payloads = {
    "idle": b"",
    "partial": b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "complete": b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "hello": b"\x16\x03\x01",
}
selector = selectors.DefaultSelector()
parked = collections.deque()
stats = dict(connects=0, closed_by_server=0, answers=0, connect_errors=0)
opened = 0

def open_one():
    global opened
    mode = modes[opened % len(modes)]
    opened += 1
    sock = socket.socket()
    sock.setblocking(False)
    error = sock.connect_ex(("127.0.0.1", port))
    if error not in (0, errno.EINPROGRESS):
        stats["connect_errors"] += 1
        sock.close()
        return
    stats["connects"] += 1
    selector.register(sock, selectors.EVENT_WRITE, mode)

def drop(sock):
    selector.unregister(sock)
    sock.close()

end = time.monotonic() + seconds
while time.monotonic() < end and stats["connects"] < max_connects:
    while len(selector.get_map()) < hold:
        open_one()
    for key, events in selector.select(0.05):
        sock, mode = key.fileobj, key.data
        if events & selectors.EVENT_WRITE:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                stats["connect_errors"] += 1
                drop(sock)
                continue
            try:
                sock.send(payloads[mode])
            except OSError:
                stats["closed_by_server"] += 1
                drop(sock)
                continue
            selector.modify(sock, selectors.EVENT_READ, mode)
            continue
        try:
            data = sock.recv(65536)
        except OSError:
            data = None
        if data:
            stats["answers"] += data.count(b"HTTP/1.1 ")
            continue
        stats["closed_by_server"] += 1
        if mode == "complete" and data is not None:
            # Answered and half-closed by the server: keep our side open.
            selector.unregister(sock)
            parked.append(sock)
            if len(parked) > hold:
                parked.popleft().close()
        else:
            drop(sock)
print(json.dumps(stats), flush=True)
"""


class Flood:
    """The flooding client, a subprocess bounded in time and count."""

    def __init__(
        self, port: int, *, hold: int, seconds: float, modes: str
    ) -> None:
        self.seconds = seconds
        arguments = [str(port), str(hold), str(seconds), modes]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FLOOD, *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> dict[str, int]:
        out, err = self.proc.communicate(timeout=self.seconds + 30)
        assert self.proc.returncode == 0, err.decode()
        return dict(json.loads(out))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


def probe_while_flooded(
    port: int,
    flood: Flood,
    *,
    context: ssl.SSLContext | None = None,
    probes: int = 24,
) -> list[tuple[str, int | None, float]]:
    """Probe /livez and /readyz in turn while the flood runs."""
    seen = []
    for number in range(probes):
        if not flood.running():
            break
        path = ("/livez", "/readyz")[number % 2]
        status, elapsed = probe(port, path, context)
        seen.append((path, status, round(elapsed, 3)))
        time.sleep(0.1)
    return seen


def assert_all_answered_in_time(
    seen: list[tuple[str, int | None, float]], probes: int
) -> None:
    late = [s for s in seen if s[1] != 200 or s[2] >= ANSWER_BOUND_S]
    assert not late, f"late or missing answers: {late} of {seen}"
    assert len(seen) >= probes // 2, f"the flood ended too soon: {seen}"


def lines_since(daemon: Daemon, before: str) -> list[str]:
    """What the daemon logged since its log was ``before``."""
    return daemon.log()[len(before) :].splitlines()


# ------------------------------------------------------------ malformed


def test_malformed_requests_get_4xx_and_no_traceback_floods_the_log(
    daemon_and_port: tuple[Daemon, int],
) -> None:
    daemon, port = daemon_and_port
    before = daemon.log()
    wrong = []
    for number in range(200):
        payload, expected = MALFORMED[number % len(MALFORMED)]
        status = status_of(exchange(port, payload))
        if status not in expected:
            wrong.append((payload[:60], status, expected))
    answer = exchange(port, b"GET /livez HTTP/1.1\r\n\r\n")
    logged = lines_since(daemon, before)
    assert not [line for line in logged if "Traceback" in line], logged[:20]
    assert len(logged) <= 3, logged[:20]
    assert not wrong, wrong
    assert status_of(answer) == 200, "the endpoint still serves"
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


def test_a_request_in_absolute_form_is_served(
    daemon_and_port: tuple[Daemon, int],
) -> None:
    _, port = daemon_and_port
    answer = exchange(
        port, b"GET http://127.0.0.1/livez?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status_of(answer) == 200
    assert answer.endswith(b"ok: the supervisor loop is running\n")


# ------------------------------------------------------------ slots


@pytest.mark.slow
@pytest.mark.parametrize(
    "modes",
    ["idle", "idle,partial,complete"],
    ids=["silent", "mixed"],
)
def test_livez_and_readyz_answer_within_a_second_while_slots_are_flooded(
    daemon_and_port: tuple[Daemon, int], modes: str
) -> None:
    daemon, port = daemon_and_port
    wait_until(lambda: probe(port, "/readyz")[0] == 200, timeout=15)
    before = daemon.log()
    flood = Flood(port, hold=HOLD, seconds=6.0, modes=modes)
    try:
        time.sleep(1.0)  # let it fill every slot and the listen queue
        seen = probe_while_flooded(port, flood)
        done = flood.result()
    finally:
        flood.close()
    assert_all_answered_in_time(seen, 24)
    assert done["connects"] > HOLD, f"not a flood: {done}"
    assert status_of(exchange(port, b"GET /livez HTTP/1.1\r\n\r\n")) == 200
    logged = lines_since(daemon, before)
    assert not [line for line in logged if "Traceback" in line], logged
    assert len(logged) <= 3, logged


# ------------------------------------------------------------ TLS


@pytest.fixture
def tls_daemon_and_port(
    tmp_path: Path, dsn: str
) -> Iterator[tuple[Daemon, int, ssl.SSLContext]]:
    pytest.importorskip("cryptography")
    from test_metrics import _pki_with_cryptography

    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = _pki_with_cryptography(pki_dir)
    daemon, port = start_daemon(
        tmp_path,
        dsn,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
    )
    context = ssl.create_default_context(cafile=str(pki.server_cert))
    try:
        yield daemon, port, context
    finally:
        daemon.close()


@pytest.mark.slow
def test_over_tls_idle_handshakes_do_not_keep_livez_and_readyz_waiting(
    tls_daemon_and_port: tuple[Daemon, int, ssl.SSLContext],
) -> None:
    daemon, port, context = tls_daemon_and_port
    wait_until(lambda: probe(port, "/readyz", context)[0] == 200, timeout=15)
    before = daemon.log()
    flood = Flood(port, hold=HOLD, seconds=6.0, modes="idle,hello")
    try:
        time.sleep(1.0)
        seen = probe_while_flooded(port, flood, context=context)
        done = flood.result()
    finally:
        flood.close()
    assert_all_answered_in_time(seen, 24)
    assert done["connects"] > HOLD, f"not a flood: {done}"
    assert probe(port, "/livez", context)[0] == 200
    logged = lines_since(daemon, before)
    assert not [line for line in logged if "Traceback" in line], logged
    assert len(logged) <= 3, logged


def test_over_tls_malformed_requests_get_400_without_a_traceback(
    tls_daemon_and_port: tuple[Daemon, int, ssl.SSLContext],
) -> None:
    daemon, port, context = tls_daemon_and_port
    for payload, expected in MALFORMED[:8]:
        assert status_of(exchange(port, payload, context=context)) in expected
    assert probe(port, "/livez", context)[0] == 200
    assert "Traceback" not in daemon.log()


# ------------------------------------------------------------ in process
#
# The same server in a loop of the test's own (test_metrics.ServedLoop),
# for what the daemon's fixed limits make slow to see.


@pytest.fixture
def small_server() -> Iterator[ServedLoop]:
    selector = selectors.DefaultSelector()
    server = HttpServer(
        selector,
        "127.0.0.1",
        0,
        lambda method, path: Response(200, b"fine\n"),
        limits=Limits(
            max_connections=4,
            deadline_s=30.0,
            request_deadline_s=30.0,
            log_interval_s=1.0,
        ),
    )
    loop = ServedLoop(server, selector)
    loop.start()
    try:
        yield loop
    finally:
        loop.close()


def test_a_client_filling_the_slots_displaces_only_its_own_connections(
    small_server: ServedLoop,
) -> None:
    address = ("127.0.0.1", small_server.port)
    with socket.create_connection(
        address, timeout=5, source_address=("127.0.0.2", 0)
    ) as bystander:
        wait_until(lambda: len(small_server.server.connections) == 1)
        flood = [
            socket.create_connection(address, timeout=5) for _ in range(20)
        ]
        try:
            # The flood's own connections were closed to make room for its
            # later ones; the bystander's, from another address, was not.
            wait_until(lambda: reset_count(flood) >= 20 - 3)
            bystander.sendall(b"GET /livez HTTP/1.1\r\n\r\n")
            assert exchange_rest(bystander).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in flood:
                sock.close()
    assert small_server.most_connections <= 4


def reset_count(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has closed."""
    closed = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            closed += sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            pass
        except ConnectionResetError:
            closed += 1
    return closed


def exchange_rest(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_refused_requests_are_summed_up_in_one_line_per_interval(
    small_server: ServedLoop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pdoflowd.http")
    began = time.monotonic()
    for _ in range(30):
        answer = exchange(small_server.port, b"GET http://[x/ HTTP/1.1\r\n\r\n")
        assert status_of(answer) == 400
    elapsed = time.monotonic() - began

    def summed() -> int:
        counted = 0
        for record in caplog.records:
            found = re.search(r"and (\d+) more like it", record.getMessage())
            counted += int(found[1]) if found else 1
        return counted

    wait_until(lambda: summed() == 30, timeout=10)
    assert not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in caplog.text
    assert len(caplog.records) <= 2 + elapsed / 1.0, caplog.text
    assert "refused an HTTP request from 127.0.0.1" in caplog.text
