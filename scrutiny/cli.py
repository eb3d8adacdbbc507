"""The `scrutiny` command: workers, migrations, and reading records from the terminal.

The database URL comes from ``--database-url`` or, better (it keeps a password off the
command line and out of `ps`), from the ``SCRUTINY_DATABASE_URL`` environment variable.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import click

from scrutiny.core import FeedbackResult, Record, ScrutinyError, Session

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
@click.option("--concurrency", default=32, show_default=True,
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
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
@main.command()
@_URL
@_PREFIX
@click.option("--app", "apps", multiple=True,
              help="App id (name:version), or app name when no app has that id (repeatable).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]),
              default="table", show_default=True)
def records(database_url: str | None, table_prefix: str, apps: tuple[str, ...], limit: int,
            offset: int, fmt: str) -> None:
    """Records with their feedback scores and statuses, newest first."""
    _refuse_memory(database_url, "`scrutiny records` (it reads what apps stored)")
    session = _session(database_url, table_prefix, migrate="refuse")  # reads: creates nothing
    try:
        df, _ = session.get_records_and_feedback(list(apps) or None, limit=limit,
                                                 offset=offset)
    except ScrutinyError as exc:  # (the database went away, a lock: said, not a traceback)
        _fail(str(exc))
        return
    finally:
        session.close()
    if fmt == "json":
        click.echo(df.to_json(orient="records", date_format="iso"))
    elif fmt == "csv":
        click.echo(df.to_csv(index=False), nl=False)
    else:
        click.echo(df.drop(columns=["app_id", "tags"]).to_string(max_colwidth=40)
                   if not df.empty else "no records")


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
        board = session.get_leaderboard(list(apps) or None)
    except ScrutinyError as exc:
        _fail(str(exc))
        return
    finally:
        session.close()
    if fmt == "json":
        click.echo(board.reset_index().to_json(orient="records"))
    elif fmt == "csv":
        click.echo(board.to_csv(), nl=False)
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
