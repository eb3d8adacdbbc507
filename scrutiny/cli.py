"""The `scrutiny` command: workers, migrations, and reading records from the terminal.

The database URL comes from ``--database-url`` or, better (it keeps a password off the
command line and out of `ps`), from the ``SCRUTINY_DATABASE_URL`` environment variable.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import click

from scrutiny.core import FeedbackResult, Record, ScrutinyError, Session

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["main"]

logger = logging.getLogger("scrutiny.worker")

_URL = click.option(
    "--database-url", envvar="SCRUTINY_DATABASE_URL", metavar="URL",
    help="SQLAlchemy URL (default: $SCRUTINY_DATABASE_URL, else sqlite:///scrutiny.sqlite).")
_PREFIX = click.option("--table-prefix", default="scrutiny_", show_default=True,
                       help="Prefix of Scrutiny's table names.")


def _fail(message: str) -> None:
    click.echo(f"scrutiny: error: {message}", err=True)
    sys.exit(2)


def _refuse_memory(url: str | None, what: str) -> None:
    """`memory://` is a store private to one process: a command run on it starts with an
    empty store of its own and sees nothing any app stored."""
    if url is not None and url.strip() == "memory://":
        _fail(f"{what} needs a database shared with the app: memory:// keeps everything "
              "inside the process that opened it, so this command would start with an "
              "empty store of its own; point --database-url (or $SCRUTINY_DATABASE_URL) at "
              "the app's database")


def _session(url: str | None, prefix: str, **kwargs: Any) -> Session:
    try:
        return Session(url, table_prefix=prefix, **kwargs)
    except ScrutinyError as exc:
        _fail(str(exc))
        raise  # unreachable


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="scrutiny")
def main() -> None:
    """Scrutiny: record LLM apps and judge every record."""


# ---------------------------------------------------------------------- worker
class _Progress:
    """Counts end states and logs a line every `every` seconds."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.counts: Counter[str] = Counter()
        self.retried = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last = self._start
        self._last_total = 0

    def __call__(self, result: FeedbackResult, record: Record) -> None:
        with self._lock:
            self.counts[result.status.value] += 1
            if result.attempts > 1:
                self.retried += 1

    def log(self, claimed: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        with self._lock:
            total = sum(self.counts.values())
            rate = (total - self._last_total) / max(now - self._last, 1e-9) * 60
            self._last, self._last_total = now, total
            logger.info("claimed %d, done %d, failed %d, skipped %d, retried %d; %.0f/min",
                        claimed, self.counts["done"], self.counts["failed"],
                        self.counts["skipped"], self.retried, rate)


@main.command()
@_URL
@_PREFIX
@click.option("--concurrency", default=32, show_default=True, type=click.IntRange(min=1),
              help="Feedback calls running at once in this worker.")
@click.option("--lease", "lease_seconds", default=60.0, show_default=True,
              type=click.FloatRange(min=1, max=86_400),
              help="Seconds a claim stays reserved without a heartbeat.")
@click.option("--poll-interval", default=0.5, show_default=True,
              type=click.FloatRange(min=0.01, max=3600),
              help="Seconds to wait when nothing is pending.")
@click.option("--grace", default=30.0, show_default=True,
              type=click.FloatRange(min=0, max=86_400),
              help="On SIGTERM/SIGINT, seconds to finish claimed work before releasing it.")
@click.option("--log-every", default=10.0, show_default=True,
              type=click.FloatRange(min=0.1, max=86_400),
              help="Seconds between progress lines.")
@click.option("--import-path", "import_paths", multiple=True, metavar="DIR",
              help="Add DIR to sys.path so feedback modules can be imported (repeatable).")
def worker(database_url: str | None, table_prefix: str, concurrency: int,
           lease_seconds: float, poll_interval: float, grace: float, log_every: float,
           import_paths: tuple[str, ...]) -> None:
    """Claim pending feedback results from the database and evaluate them."""
    _refuse_memory(database_url, "a worker (it claims what apps stored)")
    missing = _missing_sqlite_file(database_url or _default_url())
    if missing is not None:  # (a mistyped path made a new empty database, watched forever)
        _fail(f"no database at {missing}: a worker evaluates what apps stored there; point "
              "--database-url (or $SCRUTINY_DATABASE_URL) at the apps' database, or create "
              "it first with `scrutiny db upgrade`")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # (a line per migration step)
    sys.path[:0] = list(import_paths)
    progress = _Progress(log_every)
    session = _session(database_url, table_prefix, max_concurrency=concurrency,
                       lease_seconds=lease_seconds, flush_timeout=grace,
                       on_result=[progress])
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("received %s: finishing claimed work (up to %.0fs), claiming no more",
                    signal.Signals(signum).name, grace)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("worker %s on %s", session.owner_id, session._redacted_url())
    running = session.start_worker(poll_interval=poll_interval)
    while not stopping.wait(min(1.0, log_every)):
        progress.log(running.claimed)
    clean = session.close(timeout=grace)
    progress.log(running.claimed, force=True)
    logger.info("stopped %s", "cleanly" if clean else "with unfinished work released as "
                "pending")


# ---------------------------------------------------------------------- db
@main.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@_URL
@_PREFIX
def db_upgrade(database_url: str | None, table_prefix: str) -> None:
    """Bring the database to the newest schema (creating the tables if needed)."""
    from scrutiny.core.storage import HEAD_REVISION, SQLStore

    try:
        store = SQLStore(database_url or _default_url(), table_prefix=table_prefix)
    except ScrutinyError as exc:
        _fail(str(exc))
        return
    found = store.found_revision
    store.close()
    if found == HEAD_REVISION:
        click.echo(f"already at revision {HEAD_REVISION}")
    else:
        click.echo(f"upgraded from {found or 'an empty database'} to {HEAD_REVISION}")


def _default_url() -> str:
    from scrutiny.core._session import DEFAULT_DATABASE_URL

    return DEFAULT_DATABASE_URL


# ---------------------------------------------------------------------- reading
TABLE_LIMIT = 20
"""Records a table shows when --limit is not given (JSON and CSV hold them all)."""


def _check_apps(session: Session, apps: Sequence[str]) -> None:
    """Refuse an --app that names no app with records: a typo printed "no records" and
    exited 0, as if the app had none."""
    if not apps:
        return
    known = session.get_apps()
    names = {a["app_id"] for a in known} | {a["app_name"] for a in known}
    unknown = [a for a in apps if a not in names]
    if unknown:
        listed = ", ".join(sorted(a["app_id"] for a in known)) or "none"
        _fail(f"no records of app {', '.join(repr(a) for a in unknown)} in "
              f"{session._redacted_url()}; an --app is an app id (name:version) or an app "
              f"name. Apps with records: {listed}")


def _plain(value: Any) -> Any:
    """A cell as JSON data: NaN, NA and NaT as null, times in ISO 8601 (microseconds and
    offset kept), numpy scalars as numbers, nested containers likewise."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | bool) or value is None:
        return value
    if isinstance(value, datetime | date):  # (pandas' Timestamp is a datetime)
        return None if value != value else value.isoformat()  # (NaT is not equal to itself)
    item = getattr(value, "item", None)  # a numpy scalar
    if callable(item) and getattr(value, "ndim", None) == 0:
        value = item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float):
        return value
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _to_json(df: pd.DataFrame) -> str:
    """Every row and column, every digit: pandas' to_json rounded floats to 10 digits and
    times to milliseconds."""
    rows = [{str(k): _plain(v) for k, v in row.items()}
            for row in df.to_dict(orient="records")]
    return json.dumps(rows, allow_nan=False)


def _to_csv(df: pd.DataFrame, index: bool) -> str:
    """CSV (RFC 4180 quoting: commas, quotes and newlines inside cells survive); lists and
    mappings as JSON text rather than Python's repr."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = [json.dumps(_plain(v)) if isinstance(v, dict | list | tuple) else v
                        for v in out[col]]
    return str(out.to_csv(index=index, lineterminator="\n"))


@main.command()
@_URL
@_PREFIX
@click.option("--app", "apps", multiple=True,
              help="App id (name:version), or app name when no app has that id (repeatable).")
@click.option("--limit", default=None, type=click.IntRange(min=1),
              help=f"Records to show (default: {TABLE_LIMIT} in a table, all in JSON and CSV).")
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0, max=2**62),
              help="Newest records to skip.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]),
              default="table", show_default=True)
def records(database_url: str | None, table_prefix: str, apps: tuple[str, ...],
            limit: int | None, offset: int, fmt: str) -> None:
    """Records with their feedback scores and statuses, newest first."""
    _refuse_memory(database_url, "`scrutiny records` (it reads what apps stored)")
    session = _session(database_url, table_prefix, migrate="refuse")  # reads: creates nothing
    table = fmt == "table"
    if table and limit is None:
        limit = TABLE_LIMIT
    try:
        _check_apps(session, apps)
        # (one more than shown: a table says when there are more)
        df, _ = session.get_records_and_feedback(
            list(apps) or None, limit=None if limit is None else limit + table, offset=offset)
    except ScrutinyError as exc:  # (the database went away, a lock: said, not a traceback)
        _fail(str(exc))
        return
    finally:
        session.close()
    if fmt == "json":
        click.echo(_to_json(df))
    elif fmt == "csv":
        click.echo(_to_csv(df, index=False), nl=False)
    elif df.empty:
        click.echo("no records" + (f" after the newest {offset}" if offset else ""))
    else:
        more = limit is not None and len(df) > limit
        shown = df.iloc[:limit] if more else df
        click.echo(shown.drop(columns=["app_id", "tags"]).to_string(max_colwidth=40))
        if more:
            click.echo(f"scrutiny: showing records {offset + 1} to {offset + len(shown)}; "
                       f"more with --offset {offset + len(shown)} or a larger --limit "
                       "(--format json or csv for all, with full texts)", err=True)


@main.command()
@_URL
@_PREFIX
@click.option("--app", "apps", multiple=True,
              help="App id (name:version), or app name when no app has that id (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]),
              default="table", show_default=True)
def leaderboard(database_url: str | None, table_prefix: str, apps: tuple[str, ...],
                fmt: str) -> None:
    """Mean score per app version per feedback, best first."""
    _refuse_memory(database_url, "`scrutiny leaderboard` (it reads what apps stored)")
    session = _session(database_url, table_prefix, migrate="refuse")  # reads: creates nothing
    try:
        _check_apps(session, apps)
        board = session.get_leaderboard(list(apps) or None)
    except ScrutinyError as exc:
        _fail(str(exc))
        return
    finally:
        session.close()
    if fmt == "json":
        click.echo(_to_json(board.reset_index()))
    elif fmt == "csv":
        click.echo(_to_csv(board, index=True), nl=False)
    else:
        click.echo(board.to_string() if not board.empty else "no records")


# ---------------------------------------------------------------------- dashboard
def _url_password(url: str) -> bool:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password is not None
    except ArgumentError:
        return False


def _missing_sqlite_file(url: str) -> str | None:
    """The path of a SQLite database file that does not exist (None otherwise)."""
    import os

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or path in (None, "", ":memory:"):
        return None
    return None if os.path.exists(path) or path.startswith("file:") else path


@main.command()
@_URL
@_PREFIX
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback requires an access token.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on; 0 picks a free one.")
@click.option("--token", envvar="SCRUTINY_DASHBOARD_TOKEN", metavar="TOKEN",
              help="Access token every request must carry (default: "
                   "$SCRUTINY_DASHBOARD_TOKEN, which keeps it out of `ps`).")
def dashboard(database_url: str | None, table_prefix: str, host: str, port: int,
              token: str | None) -> None:
    """Serve the read-only web dashboard until Ctrl-C."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if (database_url and ctx.get_parameter_source("database_url") is ParameterSource.COMMANDLINE
            and _url_password(database_url)):
        _fail("the database URL holds a password, and every user can read a command line "
              "(ps); put the URL in $SCRUTINY_DATABASE_URL instead of --database-url")
    if token and ctx.get_parameter_source("token") is ParameterSource.COMMANDLINE:
        click.echo("scrutiny: note: --token is visible to other users in `ps`; prefer "
                   "$SCRUTINY_DASHBOARD_TOKEN", err=True)
    try:
        from scrutiny.dashboard import start_dashboard
    except ModuleNotFoundError as exc:
        _fail(f"the dashboard needs the extra: pip install 'scrutiny[dashboard]' ({exc})")
        return
    missing = _missing_sqlite_file(database_url or _default_url())
    if missing is not None:
        _fail(f"no database at {missing}: record something first, or point "
              "$SCRUTINY_DATABASE_URL (or --database-url) at your database")
    session = _session(database_url, table_prefix, migrate="refuse")
    try:
        handle = start_dashboard(session, host=host, port=port, token=token)
    except ScrutinyError as exc:
        session.close()
        _fail(str(exc))
        return
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(f"Scrutiny dashboard: {handle.url}")
    click.echo(f"reading {session._redacted_url()} (read-only); Ctrl-C stops it", err=True)
    while not stopping.wait(1.0) and handle.running:
        pass
    handle.stop()
    session.close()


if __name__ == "__main__":  # pragma: no cover
    main()
