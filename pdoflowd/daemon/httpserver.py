"""A small HTTP endpoint served from the supervisor's own selectors loop.

Owns one listening socket and its connections: non-blocking accept, TLS
handshakes (optionally requiring client certificates), reading a request of
bounded size, writing the answer and closing. Each connection answers one
GET or HEAD through a handler function. It must not block, start a thread,
or know what its pages mean (:mod:`pdoflowd.daemon.metrics` does).

Clients are assumed hostile, and a client costs a socket, never the
loop's time: every call does a bounded amount of non-blocking work.

- Bytes: whatever a client sends, it gets 400, 405, 414, 431 or 505, or is
  dropped; nothing it sends raises out of this module. What it costs the
  log is at most one line per ``Limits.log_interval_s`` for each kind of
  trouble (refused requests, evictions, failed accepts, errors), the rest
  counted in the next line; a traceback only for a bug of ours, as rarely.
- Time: a connection has ``request_deadline_s`` for its handshake and
  request, ``deadline_s`` from accept to close; one event accepts at most
  ``max_connections // 4`` clients.
- Slots: at most ``max_connections`` are open. When full, a new client is
  still let in, gets one non-blocking read (a request already there is
  answered at once), and one connection is closed, the newcomer included:
  one of the peer (an IPv4 address or an IPv6 /64) holding the most
  connections; of those, one whose answer is written, else one whose
  client has sent nothing (no byte of a request, no whole TLS ClientHello)
  and still has nothing after a last non-blocking read, else one under way
  with its request or handshake, else one still being answered; the oldest
  of its kind. So a client filling the slots (connecting in a loop, sending
  nothing, never handshaking) only displaces itself, and the listen queue
  never stops draining.

It stays one module, longer than most: the connection's states, the
eviction order and the server's limits make one argument about a hostile
client, and are read together to check it.
"""

from __future__ import annotations

import contextlib
import enum
import http
import ipaddress
import logging
import math
import re
import selectors
import socket
import ssl
import struct
import time
from collections import Counter
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
_BACKLOG = 512
_LOGGED_BYTES = 100

# A request line as RFC 9112 has it: method token, one space, a target of
# visible ASCII, one space, HTTP/d.d. Everything else is a bad request.
_REQUEST_LINE = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/([0-9])\.[0-9]"
)


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
    """What one client may cost the loop.

    ``max_connections`` open at once; ``max_request_bytes`` of request
    head; ``request_deadline_s`` from accept to a whole request (TLS
    handshake included), ``deadline_s`` from accept to close; at most one
    log line per ``log_interval_s`` for each kind of client trouble.
    """

    max_connections: int = 32
    max_request_bytes: int = 8192
    deadline_s: float = 5.0
    request_deadline_s: float = 2.0
    log_interval_s: float = 60.0


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


# Which connection makes room for a new client, within the busiest peer
# (higher first): one whose answer is written (the kernel still delivers
# it), one whose client has sent nothing, one whose client is under way
# with its handshake or request, last one whose answer is being written.
_DONE, _SILENT, _UNDER_WAY, _ANSWERING = 3, 2, 1, 0


class _Throttled:
    """One kind of log line, at most once per interval; the rest counted.

    The first event after a quiet interval is logged at once; later ones
    are counted and summed up in one line when the interval has passed.
    """

    def __init__(self, level: int, interval_s: float) -> None:
        self.level = level
        self.interval_s = interval_s
        self._quiet_until = -math.inf
        self._since = 0.0
        self._count = 0
        self._latest: tuple[str, tuple[object, ...]] = ("", ())

    def emit(
        self,
        now: float,
        message: str,
        *args: object,
        exc_info: bool = False,
    ) -> None:
        self.flush(now)
        if now >= self._quiet_until:
            log.log(self.level, message, *args, exc_info=exc_info)
            self._quiet_until = now + self.interval_s
            self._since = now
            return
        self._count += 1
        self._latest = (message, args)

    def flush(self, now: float) -> None:
        """Sum up the events counted, once their interval has passed."""
        if not self._count or now < self._quiet_until:
            return
        message, args = self._latest
        log.log(
            self.level,
            message + " (and %d more like it in %.0f s; the latest shown)",
            *args,
            self._count,
            now - self._since,
        )
        self._count = 0
        self._quiet_until = now + self.interval_s
        self._since = now


class _Listener:
    """The selector's data for the listening socket."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server


class _Connection:
    """One client, from accept to close; the selector's data for it."""

    def __init__(
        self, server: HttpServer, sock: socket.socket, peer: str, serial: int
    ) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.serial = serial
        limits = server.limits
        self.accepted_at = server.clock()
        self.deadline = self.accepted_at + min(
            limits.request_deadline_s, limits.deadline_s
        )
        tls = isinstance(sock, ssl.SSLSocket)
        self.state = _State.HANDSHAKE if tls else _State.READ
        self.events = selectors.EVENT_READ
        self.request = bytearray()
        self.outbox = memoryview(b"")
        self.drained = 0

    @property
    def eviction_rank(self) -> int:
        """How readily this connection makes room for a new client."""
        if self.state is _State.HANDSHAKE:
            # Under way once a whole ClientHello came: a client that
            # connects and never handshakes (or starts and stalls) is
            # silent.
            hello = self.sock in self.server.hellos
            return _UNDER_WAY if hello else _SILENT
        if self.state is _State.READ:
            tls = isinstance(self.sock, ssl.SSLSocket)
            return _UNDER_WAY if self.request or tls else _SILENT
        if self.state is _State.WRITE:
            return _ANSWERING
        return _DONE

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
        except Exception:
            # A bug of ours that some client's bytes reached: it must cost
            # that client its connection, never the supervisor its loop.
            self.server.throttled_error(
                "HTTP client %s dropped on an unexpected error", self.peer
            )
            self.abort()

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
            if 0 <= end <= limit:
                self._request_done()
                self._respond(self._answer(bytes(self.request[:end])))
                return
            if len(self.request) > limit:
                self._request_done()
                self._respond(self._too_large(limit))
                return

    def _request_done(self) -> None:
        self.deadline = self.accepted_at + self.server.limits.deadline_s

    def _too_large(self, limit: int) -> Response:
        if b"\n" not in self.request[:limit]:
            return self._refuse(
                http.HTTPStatus.REQUEST_URI_TOO_LONG,
                "request line longer than the limit",
                bytes(self.request),
            )
        return self._refuse(
            http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head longer than the limit",
            bytes(self.request),
        )

    def _refuse(self, status: int, why: str, line: bytes) -> Response:
        """Refuse a request; one log line now and then, never a traceback."""
        self.server.refused(self.peer, why, line)
        phrase = http.HTTPStatus(status).phrase.lower()
        return Response(status, f"{phrase}\n".encode())

    def _answer(self, head: bytes) -> Response:
        line = head.split(b"\n", 1)[0].removesuffix(b"\r")
        parsed = _REQUEST_LINE.fullmatch(line)
        if parsed is None:
            return self._refuse(
                http.HTTPStatus.BAD_REQUEST, "malformed request line", line
            )
        if parsed[3] != b"1":
            return self._refuse(
                http.HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                "HTTP version other than 1.x",
                line,
            )
        # The pattern let through visible ASCII only.
        method = parsed[1].decode("ascii")
        path = _path_of(parsed[2].decode("ascii"))
        if path is None:
            return self._refuse(
                http.HTTPStatus.BAD_REQUEST, "malformed request target", line
            )
        if method not in ("GET", "HEAD"):
            return Response(
                http.HTTPStatus.METHOD_NOT_ALLOWED,
                b"method not allowed\n",
                headers=(("Allow", "GET, HEAD"),),
            )
        try:
            response = self.server.handler(method, path)
        except Exception:
            self.server.throttled_error(
                "the HTTP handler failed on %s %r", method, path
            )
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

    def evict(self) -> None:
        """Make room for a new client.

        A written answer is left to the kernel to deliver (our side is
        already shut); anything else is reset.
        """
        if self.state is _State.DRAIN:
            self.close()
        else:
            self.abort()

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


def _peer(address: object) -> str:
    """Whose connection this is: the client's IPv4 address, or its IPv6
    /64 (one host may hold a whole /64)."""
    host = address[0] if isinstance(address, tuple) and address else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return str(host) or "?"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _path_of(target: str) -> str | None:
    """The path of a request target, or None when it is not one.

    Origin form (``/livez?x``) or absolute form (``http://host/livez``).
    """
    if target.startswith("/"):
        return target.split("?", 1)[0].split("#", 1)[0]
    try:
        url = urlsplit(target)
    except ValueError:  # e.g. "http://[x/": an unclosed IPv6 bracket
        return None
    if url.scheme not in ("http", "https") or not url.netloc:
        return None
    return url.path or "/"


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
        interval = self.limits.log_interval_s
        self._refusals = _Throttled(logging.WARNING, interval)
        self._evictions = _Throttled(logging.WARNING, interval)
        self._accept_errors = _Throttled(logging.WARNING, interval)
        self._errors = _Throttled(logging.ERROR, interval)
        self._serial = 0
        self.hellos: set[socket.socket] = set()
        self._watch_hellos(tls)
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
        self._watch_hellos(context)
        self.tls = context

    def _watch_hellos(self, context: ssl.SSLContext | None) -> None:
        # OpenSSL calls the server-name callback once per complete
        # ClientHello, with or without SNI: the sign that a handshake is
        # under way. A context with a callback of its own is left alone;
        # its handshakes then count as silent until they complete.
        if context is None:
            return
        current = context.sni_callback
        if current is None or (
            getattr(current, "__func__", None) is HttpServer._hello_received
        ):
            context.sni_callback = self._hello_received

    def _hello_received(
        self,
        sock: ssl.SSLSocket | ssl.SSLObject,
        server_name: str | None,
        context: ssl.SSLContext,
    ) -> None:
        if isinstance(sock, ssl.SSLSocket):
            self.hellos.add(sock)

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
            # A connection closed earlier in the same batch of events
            # (evicted, say) does nothing here.
            data.step()
            return True
        return False

    def expire(self) -> None:
        """Drop the connections whose deadline has passed."""
        now = self.clock()
        for connection in [c for c in self.connections if c.deadline <= now]:
            log.debug("HTTP client dropped: deadline passed")
            connection.abort()
        for throttled in (
            self._refusals,
            self._evictions,
            self._accept_errors,
            self._errors,
        ):
            throttled.flush(now)

    def close(self) -> None:
        """Close every connection and the listening socket."""
        for connection in list(self.connections):
            connection.close()
        self._pause()
        self._listener.close()

    def forget(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        self.hellos.discard(connection.sock)

    def refused(self, peer: str, why: str, line: bytes) -> None:
        """Log a refused request now and then; ``line`` is the client's."""
        self._refusals.emit(
            self.clock(),
            "refused an HTTP request from %s: %s: %r",
            peer,
            why,
            line[:_LOGGED_BYTES],
        )

    def throttled_error(self, message: str, *args: object) -> None:
        """Log the exception being handled, its traceback now and then."""
        self._errors.emit(self.clock(), message, *args, exc_info=True)

    def _accept(self) -> None:
        # Bounded, so a flood of connections costs each event a few accepts.
        for _ in range(max(1, self.limits.max_connections // 4)):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: try again on the next event.
                self._accept_errors.emit(
                    self.clock(), "cannot accept an HTTP client: %s", exc
                )
                return
            self._adopt(sock, address)
            if len(self.connections) > self.limits.max_connections:
                self._make_room()

    def _make_room(self) -> None:
        """Close one connection, the newcomer included, to stay in bounds.

        The busiest peer's connections go first, so a client that fills
        the slots displaces itself; within them, by rank, then the oldest.
        One that looks silent gets a last non-blocking read first: if its
        request has come, it is served instead.
        """
        # Ends: a connection's rank never goes back to silent, so each turn
        # either closes one or leaves one silent connection fewer.
        while True:
            peers = Counter(c.peer for c in self.connections)
            victim = max(
                self.connections,
                key=lambda c: (peers[c.peer], c.eviction_rank, -c.serial),
            )
            if victim.eviction_rank == _SILENT:
                victim.step()
                if victim.state is _State.CLOSED:
                    return
                if victim.eviction_rank != _SILENT:
                    continue
            self._evictions.emit(
                self.clock(),
                "HTTP endpoint full (%d connections): closed one of %s"
                " (%s) to let a new client in",
                len(self.connections),
                victim.peer,
                victim.state.value,
            )
            victim.evict()
            return

    def _adopt(self, sock: socket.socket, address: object) -> None:
        peer = _peer(address)
        try:
            sock.setblocking(False)
            if self.tls is not None:
                sock = self.tls.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
        except (ssl.SSLError, OSError) as exc:
            log.debug("HTTP client dropped: %s", exc)
            sock.close()
            return
        self._serial += 1
        connection = _Connection(self, sock, peer, self._serial)
        try:
            self.selector.register(sock, selectors.EVENT_READ, connection)
        except (OSError, ValueError) as exc:
            # ENOSPC (the user's epoll watches are used up) and the like.
            self._accept_errors.emit(
                self.clock(), "cannot watch an HTTP client: %s", exc
            )
            sock.close()
            return
        self.connections.add(connection)
        # A local client's request is usually here already: answering it
        # now means no later arrival can displace it unanswered.
        connection.step()

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
