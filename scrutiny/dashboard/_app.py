"""The ASGI app: a read-only JSON API over the Session query API, and the page that uses it.

Routes (GET only; every other method is refused):

``/``                       the page (static HTML; everything it needs ships in ``static/``)
``/api/info``               the database (password redacted), whether a token is required
``/api/apps``               app versions with record counts, mean latency and tokens
``/api/leaderboard``        versions x feedbacks: mean of done scores with counts by status
``/api/records``            a page of records, filtered (see :func:`_record_filters`)
``/api/records/{id}``       one record with its span tree, contexts and feedback results
``/api/record?id=``         the same, for any id (a path cannot carry the ids "." and "..")
``/api/charts``             score distributions per version and latency over time (a sample)

Safety: with a token, every request needs it (``Authorization: Bearer``, the cookie the page
gets when opened with ``?token=``, or ``?token=`` itself); without one, only requests
addressed to a loopback name are served (no DNS rebinding). Every answer carries a strict
Content-Security-Policy (no inline script, nothing from other origins) and a
``Server-Timing`` header with the time the app spent on it.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scrutiny.cli import redact_secrets, shown_url
from scrutiny.core import ConfigurationError, ScrutinyError, Session
from scrutiny.core._serialize import dumps
from scrutiny.dashboard import _views

__all__ = ["LOOPBACK_HOSTS", "create_app"]

logger = logging.getLogger("scrutiny.dashboard")

STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_HOST_HEADER = re.compile(r"(?P<name>\[[^\]]*\]|[^:\[\]]*)(?::[0-9]{1,5})?")
_COOKIE = "scrutiny_token_{port}"
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_SECURITY_HEADERS = [
    (b"content-security-policy", _CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
_ASK_FOR_ACCESS = (
    "<!doctype html><meta charset=utf-8><title>Scrutiny: access token needed</title>"
    "<p>This dashboard needs its access token. Open the URL that <code>scrutiny "
    "dashboard</code> printed (it ends in <code>?token=...</code>).</p>")


class JSONResponse(Response):
    """JSON through Scrutiny's own encoder (never raises; NaN becomes null)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


class _Guard:
    """Host and token checks, security headers and `Server-Timing`, as ASGI middleware."""

    def __init__(self, app: ASGIApp, *, token: str | None,
                 allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = None if allowed_hosts is None else {
            h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - began) * 1000
                extra = [h for h in _SECURITY_HEADERS
                         if not (static and h[0] == b"cache-control")]
                extra.append((b"server-timing", f"app;dur={ms:.1f}".encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        request = Request(scope)
        refusal = self._refuse(request)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refuse(self, request: Request) -> Response | None:
        """A response that refuses `request`, or None to serve it."""
        if self.allowed_hosts is not None:
            host = (request.headers.get("host") or "").lower()
            match = _HOST_HEADER.fullmatch(host)  # name[:port], nothing else
            name = match.group("name") if match else None
            if host not in self.allowed_hosts and name not in self.allowed_hosts:
                return JSONResponse({"error": "this dashboard answers only on its loopback "
                                     "address"}, status_code=421)
        if self.token is None:
            return None
        cookie = _COOKIE.format(port=request.url.port or 0)
        given = request.query_params.get("token")
        if given is not None and _same(given, self.token):
            if request.url.path == "/":  # keep the token out of the address bar & history
                rest = request.url.remove_query_params("token").query
                # (relative: never to whatever host the Host header named)
                redirect = RedirectResponse("./" + (f"?{rest}" if rest else ""),
                                            status_code=303)
                redirect.set_cookie(cookie, self.token, httponly=True, samesite="strict",
                                    path="/")
                return redirect
            return None
        auth = request.headers.get("authorization", "")
        bearer = auth[7:] if auth[:7].lower() == "bearer " else None
        for candidate in (bearer, request.cookies.get(cookie)):
            if candidate is not None and _same(candidate, self.token):
                return None
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "missing or wrong access token"}, status_code=401,
                                headers={"www-authenticate": "Bearer"})
        return Response(_ASK_FOR_ACCESS, status_code=401, media_type="text/html")


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


# ---------------------------------------------------------------------- parameters
def _one(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    return value if value not in (None, "") else None


def _many(request: Request, name: str) -> list[str]:
    return [v for v in request.query_params.getlist(name) if v]


def _float(request: Request, name: str) -> float | None:
    value = _one(request, name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number, got {value!r}") from None


def _int(request: Request, name: str, default: int) -> int:
    value = _one(request, name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer, got {value!r}") from None


def _record_filters(request: Request) -> dict[str, Any]:
    """Query parameters of ``/api/records`` as :meth:`Session.query_records` arguments.

    ``app`` (an app id, or a name when no app has that id; repeatable), ``version``
    (repeatable), ``record_status`` (ok, error, cancelled), ``status`` (repeatable: a result
    of ``feedback``, or of any feedback without it), ``feedback`` with ``min_score`` /
    ``max_score``, ``q`` (text in the input or output),
    ``limit`` (1..1000, default 50), ``offset``.
    """
    filters = {
        "app_ids": _many(request, "app") or None,
        "app_versions": _many(request, "version") or None,
        "record_status": _one(request, "record_status"),
        "feedback_name": _one(request, "feedback"),
        "statuses": _many(request, "status") or None,
        "min_score": _float(request, "min_score"),
        "max_score": _float(request, "max_score"),
        "search": _one(request, "q"),
        "limit": _int(request, "limit", 50),
        "offset": _int(request, "offset", 0),
    }
    if not filters["feedback_name"]:  # (the core's message names its own `feedback_name=`)
        given = [name for name in ("min_score", "max_score") if _one(request, name)]
        if given:  # (a status alone matches a result of any feedback)
            raise HTTPException(400, f"filtering by {' and '.join(given)} needs "
                                "feedback=<name>: the feedback whose scores to filter")
    return filters


# ---------------------------------------------------------------------- the app
def create_app(session: Session, *, token: str | None = None,
               allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
               poll_interval: float = 1.0) -> Starlette:
    """The dashboard of `session`'s database as an ASGI app (to mount or serve yourself).

    Args:
        session: read through its public query API only; nothing is ever written.
        token: when given, every request must carry it.
        allowed_hosts: ``Host`` names served when there is no token (default: loopback
            names only); None serves any.
        poll_interval: seconds between the page's refreshes while results are pending.
    """
    url = session.database_url
    database = shown_url(url)  # (no password, and no ?password= either)
    page = (STATIC / "index.html").read_bytes()

    def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    def info(request: Request) -> Response:
        return JSONResponse({"database": database, "token_required": token is not None,
                             "read_only": True, "poll_ms": int(poll_interval * 1000)})

    def apps(request: Request) -> Response:
        return JSONResponse(_views.apps(session))

    def leaderboard(request: Request) -> Response:
        return JSONResponse(_views.leaderboard(session, _many(request, "app") or None))

    def records(request: Request) -> Response:
        return JSONResponse(_views.records_page(session, **_record_filters(request)))

    def one_record(record_id: str) -> Response:
        found = session.get_record(record_id)
        if found is None:
            return JSONResponse({"error": "no such record"}, status_code=404)
        return JSONResponse(_views.record_detail(found))

    def record(request: Request) -> Response:
        return one_record(request.path_params["record_id"])

    def record_by_id(request: Request) -> Response:
        # (any id, "." and ".." too: a browser resolves those as a path's dot segments,
        # %2E or not, so the page asks for every record here)
        record_id = request.query_params.get("id")
        if record_id is None:
            raise HTTPException(400, "id=<record id> is required")
        return one_record(record_id)

    def charts(request: Request) -> Response:
        sample = _int(request, "sample", 500)
        if not 10 <= sample <= 5000:
            raise HTTPException(400, "sample must be 10..5000")
        return JSONResponse(_views.charts(
            session, _many(request, "app") or None, _many(request, "version") or None,
            sample=sample))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    async def bad_request(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": redact_secrets(str(exc), url)}, status_code=400)

    async def storage_error(request: Request, exc: Exception) -> Response:
        message = redact_secrets(str(exc), url)  # (the core's message names the database)
        logger.warning("dashboard: %s failed: %s", request.url.path, message)
        return JSONResponse({"error": message}, status_code=503)

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/apps", apps),
        Route("/api/leaderboard", leaderboard),
        Route("/api/records", records),
        Route("/api/records/{record_id:path}", record),  # (an id may hold a "/")
        Route("/api/record", record_by_id),
        Route("/api/charts", charts),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        HTTPException: http_error, ConfigurationError: bad_request,
        ScrutinyError: storage_error})
    app.add_middleware(_Guard, token=token, allowed_hosts=None if token else allowed_hosts)
    return app
