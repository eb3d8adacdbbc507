"""Serving the dashboard with uvicorn on one daemon thread: start, find the URL, stop.

The socket is bound here, before uvicorn starts, so a taken port is one clear
:class:`ConfigurationError` (not a log line and a `sys.exit` inside a thread) and port 0
gives the free port the system picked.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
from typing import Any

from scrutiny.core import ConfigurationError, Session

__all__ = ["MIN_TOKEN_CHARS", "DashboardHandle", "is_loopback", "start_dashboard"]

logger = logging.getLogger("scrutiny.dashboard")

MIN_TOKEN_CHARS = 16
_START_TIMEOUT = 15.0


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check(host: str, port: int, token: str | None) -> None:
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"port must be 0..65535 (0 picks a free one), got {port}")
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigurationError(
            f"the access token must have at least {MIN_TOKEN_CHARS} characters; make one "
            "with: python -c 'import secrets; print(secrets.token_urlsafe())'")
    if token is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve the dashboard on {host} without an access token: anyone "
            "who can reach that address could read every record. Set one with "
            "SCRUTINY_DASHBOARD_TOKEN=... (or --token / token=), or bind 127.0.0.1")


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to (host, port).

    Raises:
        ConfigurationError: the port is taken, or the address is not one of this machine's.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot bind the dashboard to {host!r}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"port {port} on {host} is already in use; choose another port, or port 0 "
                "for a free one") from None
        raise ConfigurationError(
            f"cannot bind the dashboard to {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # noqa: S104 - naming the wildcard, not binding it
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


class DashboardHandle:
    """A dashboard served in the background; `stop()` ends it (idempotent).

    Attributes:
        url: where to open it (with ``?token=...`` when a token is required).
        host, port: the address it is bound to.
    """

    def __init__(self, server: Any, thread: threading.Thread, sock: socket.socket,
                 url: str, host: str, port: int) -> None:
        self._server = server
        self._thread = thread
        self._socket = sock
        self.url = url
        self.host = host
        self.port = port

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop serving and wait at most `timeout` seconds; True when it has stopped."""
        self._server.should_exit = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._socket.close()
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (e.g. after `stop()` from another thread)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> DashboardHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<DashboardHandle {self.host}:{self.port} {state}>"


def start_dashboard(session: Session, *, host: str = "127.0.0.1", port: int = 0,
                    token: str | None = None, poll_interval: float = 1.0
                    ) -> DashboardHandle:
    """Serve the dashboard of `session`'s database on a background thread.

    Args:
        session: read through its query API only.
        host: the address to bind; anything but loopback requires `token`.
        port: the port; 0 picks a free one.
        token: an access token every request must carry (at least 16 characters).
        poll_interval: seconds between the page's refreshes while results are pending.

    Returns:
        A :class:`DashboardHandle` with `.url` and `.stop()`, once the server accepts
        connections.

    Raises:
        ConfigurationError: no token for a non-loopback address, a short token, a taken
            port or an address that is not this machine's.
    """
    import uvicorn

    from scrutiny.dashboard._app import LOOPBACK_HOSTS, create_app

    _check(host, port, token)
    app = create_app(session, token=token, allowed_hosts=(*LOOPBACK_HOSTS, host),
                     poll_interval=poll_interval)
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    started = threading.Event()
    failure: list[BaseException] = []

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await super().startup(sockets=sockets)
            finally:
                started.set()

    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                            lifespan="off", http="h11", ws="none", loop="asyncio",
                            proxy_headers=False, server_header=False,
                            timeout_graceful_shutdown=2)
    server = _Server(config)

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit from uvicorn included
            failure.append(exc)
            logger.exception("scrutiny dashboard stopped with an error")
        finally:
            started.set()

    thread = threading.Thread(target=serve, name=f"scrutiny-dashboard-{bound_port}",
                              daemon=True)
    thread.start()
    if not started.wait(_START_TIMEOUT) or failure or not server.started:
        server.should_exit = True
        sock.close()
        reason = repr(failure[0]) if failure else "it did not start in time"
        raise ConfigurationError(f"the dashboard could not start on {host}:{bound_port}: "
                                 f"{reason}")
    url = f"http://{_url_host(host)}:{bound_port}/"
    if token is not None:
        from urllib.parse import quote

        url += f"?token={quote(token, safe='')}"
    return DashboardHandle(server, thread, sock, url, host, bound_port)
