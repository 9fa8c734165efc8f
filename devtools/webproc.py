"""``pdoflowd web`` as a subprocess, for the tests, the demo and screenshots.

Owns starting the console with a config, waiting until it answers HTTP,
asking it things (with basic auth when given a user) and stopping it with
SIGTERM. It must not import the console: it talks to it over HTTP only.
"""

from __future__ import annotations

import base64
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devtools.daemonproc import checkout_environ, pdoflowd_command, write_config

__all__ = ["Answer", "WebProcess", "basic_header"]

_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 10.0


def basic_header(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Basic {token}"


class Answer:
    """One HTTP answer: status, headers, body as text."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.body = body
        self.text = body.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.text[:200]!r})"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebProcess:
    """One ``pdoflowd web --config F`` with its config and log in ``tmp``;
    with ``tls`` (the client's side: the server's CA, a client certificate)
    it is asked over HTTPS."""

    def __init__(
        self,
        tmp: Path,
        sections: Mapping[str, Any],
        *,
        name: str = "web",
        env: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config_path = write_config(tmp / f"{name}.toml", sections)
        self.log_path = tmp / f"{name}.log"
        self.env = checkout_environ()
        self.env.update(env or {})
        listen = str(sections.get("web", {}).get("listen", "127.0.0.1:9465"))
        self.url = f"{'https' if tls else 'http'}://{listen}"
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=tls))
        self.opener = urllib.request.build_opener(*handlers)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = _START_TIMEOUT_S) -> WebProcess:
        """Start it and wait until it answers (raise if it exits first)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                pdoflowd_command("web", "--config", str(self.config_path)),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # A Ctrl-C at the terminal reaches only the caller, which
                # stops the console with SIGTERM.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pdoflowd web exited with {self.proc.returncode}:"
                    f" {self.log()}"
                )
            try:
                self.get("/static/console.css")
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pdoflowd web did not answer: {self.log()}"
                    ) from None
                time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self,
        method: str,
        path: str,
        *,
        auth: tuple[str, str] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Answer:
        """One request; every status, 4xx and 5xx too, is an Answer."""
        # Always this console's own http:// or https:// URL.
        request = urllib.request.Request(  # noqa: S310
            self.url + path, data=data, method=method
        )
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        if auth is not None:
            request.add_header("Authorization", basic_header(*auth))
        try:
            with self.opener.open(request, timeout=timeout) as response:
                return Answer(
                    response.status, dict(response.headers), response.read()
                )
        except urllib.error.HTTPError as error:
            return Answer(error.code, dict(error.headers), error.read())

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)

    def stop(self) -> int | None:
        """SIGTERM, then wait (SIGKILL if it lingers); its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
