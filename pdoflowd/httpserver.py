"""A small HTTP endpoint served from the supervisor's own selectors loop.

Owns one listening socket and its connections: non-blocking accept, TLS
handshakes (optionally requiring client certificates), reading a request of
bounded size, writing the answer and closing. Each connection answers one
GET or HEAD through a handler function, has a deadline for its whole life,
and only a bounded number may be open at once, so a slow or stuck client
costs a socket, never the loop's time. It must not block, start a thread,
or know what its pages mean (:mod:`pdoflowd.metrics` does).
"""

from __future__ import annotations

import contextlib
import enum
import http
import logging
import selectors
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("pdoflowd.http")

__all__ = [
    "EndpointError",
    "Handler",
    "HttpServer",
    "Limits",
    "Response",
    "tls_context",
]

_RECV_BYTES = 4096
_DRAIN_BYTES = 65536
_BACKLOG = 64


@dataclass(frozen=True)
class Response:
    """What a handler answers: status, body and its content type."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[str, str], Response]
"""Called with the method (GET or HEAD) and the path, without the query."""


@dataclass(frozen=True)
class Limits:
    """What one client may cost the loop."""

    max_connections: int = 32
    max_request_bytes: int = 8192
    deadline_s: float = 5.0


class EndpointError(Exception):
    """The endpoint cannot be set up (address in use, unreadable cert...)."""


def tls_context(
    cert_file: Path | str,
    key_file: Path | str | None = None,
    client_ca_file: Path | str | None = None,
) -> ssl.SSLContext:
    """A server-side TLS context: TLS 1.2 or newer.

    ``key_file`` may be left out when the key is in ``cert_file``. With
    ``client_ca_file``, every client must present a certificate signed by
    one of the CAs in that file, or its handshake fails.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise EndpointError(
            f"cannot load the TLS certificate {cert_file}"
            f"{f' and key {key_file}' if key_file else ''}: {_reason(exc)}"
        ) from None
    if client_ca_file:
        try:
            context.load_verify_locations(cafile=str(client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise EndpointError(
                f"cannot load the client CA file {client_ca_file}: "
                f"{_reason(exc)}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


class _State(enum.Enum):
    HANDSHAKE = "handshake"
    READ = "read"
    WRITE = "write"
    DRAIN = "drain"
    CLOSED = "closed"


class _Listener:
    """The selector's data for the listening socket."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server


class _Connection:
    """One client, from accept to close; the selector's data for it."""

    def __init__(
        self, server: HttpServer, sock: socket.socket, deadline: float
    ) -> None:
        self.server = server
        self.sock = sock
        self.deadline = deadline
        tls = isinstance(sock, ssl.SSLSocket)
        self.state = _State.HANDSHAKE if tls else _State.READ
        self.events = selectors.EVENT_READ
        self.request = bytearray()
        self.outbox = memoryview(b"")
        self.drained = 0

    def step(self) -> None:
        """Advance as far as the socket allows, then say what to wait for."""
        try:
            if self.state is _State.HANDSHAKE:
                self._handshake()
            if self.state is _State.READ:
                self._read()
            if self.state is _State.WRITE:
                self._write()
            if self.state is _State.DRAIN:
                self._drain()
        except ssl.SSLWantReadError:
            self._wait(selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._wait(selectors.EVENT_WRITE)
        except BlockingIOError:
            self._wait(
                selectors.EVENT_WRITE
                if self.state is _State.WRITE
                else selectors.EVENT_READ
            )
        except (ssl.SSLError, OSError) as exc:
            log.debug("HTTP client dropped: %s", exc)
            self.close()

    def _handshake(self) -> None:
        assert isinstance(self.sock, ssl.SSLSocket)
        self.sock.do_handshake()
        self.state = _State.READ

    def _read(self) -> None:
        limit = self.server.limits.max_request_bytes
        while True:
            chunk = self.sock.recv(_RECV_BYTES)
            if not chunk:
                self.close()
                return
            self.request += chunk
            end = _header_end(self.request)
            if end >= 0 and end <= limit:
                self._respond(self._answer(bytes(self.request[:end])))
                return
            if len(self.request) > limit:
                self._respond(
                    Response(
                        http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                        b"request too large\n",
                    )
                )
                return

    def _answer(self, head: bytes) -> Response:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return Response(http.HTTPStatus.BAD_REQUEST, b"bad request\n")
        try:
            method = parts[0].decode("ascii")
            target = parts[1].decode("ascii")
        except UnicodeDecodeError:
            return Response(http.HTTPStatus.BAD_REQUEST, b"bad request\n")
        if method not in ("GET", "HEAD"):
            return Response(
                http.HTTPStatus.METHOD_NOT_ALLOWED,
                b"method not allowed\n",
                headers=(("Allow", "GET, HEAD"),),
            )
        try:
            response = self.server.handler(method, urlsplit(target).path)
        except Exception:
            log.exception("the HTTP handler failed on %s %s", method, target)
            response = Response(
                http.HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n"
            )
        if method == "HEAD":
            return Response(
                response.status,
                b"",
                response.content_type,
                (
                    *response.headers,
                    ("Content-Length", str(len(response.body))),
                ),
            )
        return response

    def _respond(self, response: Response) -> None:
        status = http.HTTPStatus(response.status)
        headers = {
            "Content-Type": response.content_type,
            "Content-Length": str(len(response.body)),
            "Cache-Control": "no-store",
            "Connection": "close",
        }
        headers.update(response.headers)
        head = f"HTTP/1.1 {status.value} {status.phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        self.outbox = memoryview(
            head.encode("latin-1") + b"\r\n" + response.body
        )
        self.state = _State.WRITE

    def _write(self) -> None:
        while self.outbox:
            sent = self.sock.send(self.outbox)
            self.outbox = self.outbox[sent:]
        self._finish()

    def _finish(self) -> None:
        # Close our side, then read what the client still sends until it
        # closes too: closing with unread input would reset the connection
        # and could destroy the answer before the client has read it.
        if isinstance(self.sock, ssl.SSLSocket):
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                self.sock.unwrap()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.state = _State.DRAIN

    def _drain(self) -> None:
        while True:
            chunk = self.sock.recv(_RECV_BYTES)
            self.drained += len(chunk)
            if not chunk or self.drained > _DRAIN_BYTES:
                self.close()
                return

    def _wait(self, events: int) -> None:
        if self.state is _State.CLOSED or events == self.events:
            return
        self.events = events
        self.server.selector.modify(self.sock, events, self)

    def abort(self) -> None:
        """Close with a reset: the kernel drops what the client never read."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self.close()

    def close(self) -> None:
        if self.state is _State.CLOSED:
            return
        self.state = _State.CLOSED
        self.server.forget(self)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.server.selector.unregister(self.sock)
        with contextlib.suppress(OSError):
            self.sock.close()


def _header_end(data: bytearray) -> int:
    """Where the request's head ends (after its blank line), or -1."""
    ends = [
        index + len(mark)
        for mark in (b"\r\n\r\n", b"\n\n")
        if (index := data.find(mark)) >= 0
    ]
    return min(ends) if ends else -1


class HttpServer:
    """An HTTP(S) endpoint whose sockets live in the caller's selector.

    The caller's loop passes every selector event to :meth:`handle` (which
    says whether the event was this server's) and calls :meth:`expire` at
    least every few tenths of a second.
    """

    def __init__(
        self,
        selector: selectors.BaseSelector,
        host: str,
        port: int,
        handler: Handler,
        *,
        tls: ssl.SSLContext | None = None,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.selector = selector
        self.handler = handler
        self.tls = tls
        self.limits = limits or Limits()
        self.clock = clock
        self.connections: set[_Connection] = set()
        self._token = _Listener(self)
        self._listening = False
        self._listener = _bind(host, port)
        self._resume()

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the port chosen when 0 was asked)."""
        name = self._listener.getsockname()
        return str(name[0]), int(name[1])

    def set_tls(self, context: ssl.SSLContext | None) -> None:
        """Serve later connections with ``context`` (None: plain HTTP)."""
        self.tls = context

    def fds(self) -> list[int]:
        """Every descriptor of the server: a forked child must close them."""
        return [
            self._listener.fileno(),
            *(c.sock.fileno() for c in self.connections),
        ]

    def handle(self, key: selectors.SelectorKey, events: int) -> bool:
        """Act on one selector event; False when it was not this server's."""
        data = key.data
        if data is self._token:
            self._accept()
            return True
        if isinstance(data, _Connection) and data.server is self:
            data.step()
            return True
        return False

    def expire(self) -> None:
        """Drop the connections whose deadline has passed."""
        now = self.clock()
        for connection in [c for c in self.connections if c.deadline <= now]:
            log.debug("HTTP client dropped: deadline passed")
            connection.abort()

    def close(self) -> None:
        """Close every connection and the listening socket."""
        for connection in list(self.connections):
            connection.close()
        self._pause()
        self._listener.close()

    def forget(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if len(self.connections) < self.limits.max_connections:
            self._resume()

    def _accept(self) -> None:
        while len(self.connections) < self.limits.max_connections:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: try again on the next event.
                log.warning("cannot accept an HTTP client: %s", exc)
                return
            self._adopt(sock)
        # Full: leave further clients in the kernel's backlog until one of
        # the open connections ends or expires.
        self._pause()

    def _adopt(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            except (ssl.SSLError, OSError) as exc:
                log.debug("HTTP client dropped: %s", exc)
                sock.close()
                return
        connection = _Connection(
            self, sock, self.clock() + self.limits.deadline_s
        )
        self.connections.add(connection)
        self.selector.register(sock, selectors.EVENT_READ, connection)

    def _pause(self) -> None:
        if self._listening:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self._listener)
            self._listening = False

    def _resume(self) -> None:
        if not self._listening and self._listener.fileno() >= 0:
            self.selector.register(
                self._listener, selectors.EVENT_READ, self._token
            )
            self._listening = True


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise EndpointError(f"cannot resolve {host!r}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise EndpointError(
            f"cannot listen on {where}: {_reason(exc)}"
        ) from None
    return sock
