"""The web dashboard: a read-only JSON API over the `Session` query API and a page that uses it.

Needs the extra: ``pip install 'scrutiny[dashboard]'`` (Starlette and uvicorn). Start it with
``scrutiny dashboard`` or ``session.run_dashboard()``; mount :func:`create_app` in your own
ASGI server if you prefer. The page is plain HTML, CSS and JavaScript shipped in this
package: nothing is fetched from the internet and nothing is built at install time.
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        f"the dashboard needs the extra: pip install 'scrutiny[dashboard]' ({exc})",
        name=exc.name) from exc

from scrutiny.dashboard._app import create_app
from scrutiny.dashboard._server import DashboardHandle, start_dashboard

__all__ = ["DashboardHandle", "create_app", "start_dashboard"]
