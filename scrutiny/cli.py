"""The `scrutiny` command: workers, migrations, and reading records from the terminal.

The database URL comes from ``--database-url`` or, better (it keeps a password off the
command line and out of `ps`), from the ``SCRUTINY_DATABASE_URL`` environment variable.
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus

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


# ---------------------------------------------------------------------- safe text
# (query parameters that hold a secret: password, sslpassword, ...; not passfile, a path)
_SECRET_PARAMETER = re.compile(r"(?!passfile$).*(?:pass|pwd|secret|token)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"://[^:/]*:([^@]*)@")  # (SQLAlchemy's own rule for user:password@)
_URL_PARAMETER = re.compile(r"[?&]([^=&#]*)=([^&#]*)")


def _url_secrets(url: str | None) -> list[str]:
    """The secrets a database URL holds, in every spelling a message may show them: the
    password and the values of ``?password=``-like parameters (which SQLAlchemy's
    ``hide_password`` leaves in), raw, decoded and re-encoded; longest first."""
    if not url:
        return []
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    found: list[str] = []
    match = _URL_PASSWORD.search(url)
    if match:
        found.append(match.group(1))
    for key, value in _URL_PARAMETER.findall(url):
        if _SECRET_PARAMETER.match(unquote_plus(key)):
            found.append(value)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # (a port that is not a number is a ValueError)
        parsed = None
    if parsed is not None:
        found.append(parsed.password or "")
        for key, values in parsed.query.items():
            if _SECRET_PARAMETER.match(key):
                found.extend([values] if isinstance(values, str) else values)
    spellings = {form for secret in found if secret
                 for form in (secret, unquote(secret), unquote_plus(secret),
                              quote(secret, safe=""), quote_plus(secret))}
    return sorted((s for s in spellings if s), key=len, reverse=True)


def redact_secrets(text: str, url: str | None) -> str:
    """`text` with every secret of the database `url` replaced by ``***`` (also shared by
    the dashboard, for its error messages)."""
    for secret in _url_secrets(url):
        # (only where it stands alone: replaced inside words, a short password garbled
        # the message — "po***tgre***ql" — and gave itself away)
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
    return text


def shown_url(url: str) -> str:
    """A database URL as messages and the dashboard show it: no password, and no
    ``?password=``-like parameter either."""
    if "://" not in url or url.startswith("memory:"):
        return url
    from scrutiny.core.storage import redact_url

    try:
        shown = redact_url(url)
    except ValueError:  # (a port that is not a number)
        shown = "<invalid database url>"
    return redact_secrets(shown, url)


_CONTROL = (r"\x00-\x08\x0b-\x1f\x7f-\x9f"  # C0 but tab and newline, DEL, C1
            r"\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069")  # bidi, separators
_UNPRINTABLE = re.compile(f"[\\t\\n{_CONTROL}]")
_UNPRINTABLE_BUT_LINES = re.compile(f"[{_CONTROL}]")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(char)
    return named or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def printable(text: str, *, keep_lines: bool = False) -> str:
    """`text` safe for a terminal: control characters (escape sequences that set a title,
    write the clipboard or hide text, carriage returns that overwrite a line) and
    bidirectional overrides shown as escapes (``\\x1b``); newlines and tabs too unless
    `keep_lines`. Record content comes from an app's users: it must not drive the
    terminal of whoever reads it."""
    return (_UNPRINTABLE_BUT_LINES if keep_lines else _UNPRINTABLE).sub(_escape_char, text)


def _fail(message: str, url: str | None = None) -> None:
    """Exit 2 with `message` (any secret of the database `url` hidden, control characters
    escaped)."""
    message = printable(redact_secrets(message, url), keep_lines=True)
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
    except (ScrutinyError, ValueError) as exc:  # (a port that is not a number: ValueError)
        _fail(str(exc) if isinstance(exc, ScrutinyError) else f"not a database URL: {exc}",
              url)
        raise  # unreachable


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="scrutiny")
def main() -> None:
    """Scrutiny: record LLM apps and judge every record."""


# ---------------------------------------------------------------------- worker
class _LogFormatter(logging.Formatter):
    """A worker's log: one line per event, whatever a message holds (a feedback's error
    can quote record content: a newline in it forged a log line, an escape sequence drove
    the terminal); no secret of the database URL."""

    def __init__(self, fmt: str, url: str | None) -> None:
        super().__init__(fmt)
        self.url = url

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return printable(redact_secrets(super().formatMessage(record), self.url))

    def formatException(self, ei: Any) -> str:  # noqa: N802
        return printable(redact_secrets(super().formatException(ei), self.url),
                         keep_lines=True)

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return printable(super().formatStack(stack_info), keep_lines=True)


class _Progress:
    """Counts end states and logs a line every `every` seconds while there is work: an
    idle worker logged the same counts every 10 s for as long as it waited (8,640 lines a
    day each, burying the lines that said something)."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.counts: Counter[str] = Counter()
        self.retried = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last = self._start
        self._last_total = 0
        self._last_claimed = 0

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
            if not force and total == self._last_total and claimed == self._last_claimed:
                self._last = now  # nothing new to say (the next rate counts from here)
                return
            rate = (total - self._last_total) / max(now - self._last, 1e-9) * 60
            self._last, self._last_total, self._last_claimed = now, total, claimed
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
              help="On SIGTERM/SIGINT, seconds to finish claimed work before releasing it "
                   "(a second signal releases it at once).")
@click.option("--log-every", default=10.0, show_default=True,
              type=click.FloatRange(min=0.1, max=86_400),
              help="Seconds between progress lines.")
@click.option("--import-path", "import_paths", multiple=True, metavar="DIR",
              type=click.Path(exists=True, file_okay=False, resolve_path=True),
              help="Add DIR to sys.path so feedback modules can be imported (repeatable).")
@click.option("--feedback-timeout", default=120.0, show_default=True,
              type=click.FloatRange(min=0.001, max=86_400),
              help="Seconds one attempt of a feedback may take when the feedback sets no "
                   "timeout of its own.")
def worker(database_url: str | None, table_prefix: str, concurrency: int,
           lease_seconds: float, poll_interval: float, grace: float, log_every: float,
           import_paths: tuple[str, ...], feedback_timeout: float) -> None:
    """Claim pending feedback results from the database and evaluate them.

    Feedbacks are loaded by their import path (module:function) as the app stored them:
    their modules must be importable here (installed, or in a folder given with
    --import-path). Progress is logged every --log-every seconds while there is work."""
    _refuse_memory(database_url, "a worker (it claims what apps stored)")
    missing = _missing_sqlite_file(database_url or _default_url())
    if missing is not None:  # (a mistyped path made a new empty database, watched forever)
        _fail(f"no database at {missing}: a worker evaluates what apps stored there; point "
              "--database-url (or $SCRUTINY_DATABASE_URL) at the apps' database, or create "
              "it first with `scrutiny db upgrade`")
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormatter("%(asctime)s %(name)s %(message)s", database_url))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("alembic").setLevel(logging.WARNING)  # (a line per migration step)
    sys.path[:0] = list(import_paths)
    progress = _Progress(log_every)
    session = _session(database_url, table_prefix, max_concurrency=concurrency,
                       lease_seconds=lease_seconds, flush_timeout=grace,
                       feedback_timeout=feedback_timeout, on_result=[progress])
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        # (each state is set before it is logged: a signal arriving while this handler
        # logs runs the handler again inside it, and must find the first one counted)
        if stopping.is_set():  # told twice: the claimed work goes back now
            session._cut_close_short()
            logger.info("received %s again: releasing the unfinished work as pending now",
                        signal.Signals(signum).name)
            return
        stopping.set()
        logger.info("received %s: finishing claimed work (up to %.0fs), claiming no more; "
                    "send it again to release the unfinished work at once",
                    signal.Signals(signum).name, grace)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _say_start(session, table_prefix, concurrency)
    running = session.start_worker(poll_interval=poll_interval)
    while not stopping.wait(min(1.0, log_every)):
        progress.log(running.claimed)
    clean = session.close(timeout=grace)
    progress.log(running.claimed, force=True)
    logger.info("stopped %s", "cleanly" if clean else "with unfinished work released as "
                "pending")


def _say_start(session: Session, table_prefix: str, concurrency: int) -> None:
    """The worker's first lines: where it works, what waits there — and when it found no
    Scrutiny tables there (it created them), that no app has stored anything there: a
    mistyped database name or --table-prefix on a PostgreSQL server made a worker that
    waited for ever on tables of its own, its log the same as a worker's with no work."""
    where = shown_url(session.database_url)
    try:
        counts = session.store.count_results()
    except Exception as exc:  # (said; the worker's own retries take it from here)
        logger.info("worker %s on %s (could not count the pending results: %s)",
                    session.owner_id, where, exc)
        return
    # (a running one is claimable too once its lease runs out: its process died)
    logger.info("worker %s on %s: %d result(s) pending, %d running (claimable once their "
                "lease runs out); evaluating up to %d at once", session.owner_id, where,
                counts.get("pending", 0), counts.get("running", 0), concurrency)
    if getattr(session.store, "found_revision", "") is None:
        logger.warning("no Scrutiny tables (prefix %r) were in %s: this worker created them, "
                       "so no app has stored anything there yet. If the apps store into "
                       "another database or with another --table-prefix, this worker waits "
                       "for ever: point it at theirs", table_prefix, where)


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
    except (ScrutinyError, ValueError) as exc:
        _fail(str(exc) if isinstance(exc, ScrutinyError) else f"not a database URL: {exc}",
              database_url)
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
        listed = ", ".join(sorted(printable(a["app_id"]) for a in known)) or "none"
        _fail(f"no records of app {', '.join(repr(a) for a in unknown)} in "
              f"{shown_url(session.database_url)}; an --app is an app id (name:version) or "
              f"an app name. Apps with records: {listed}", session.database_url)


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


def _map_texts(df: pd.DataFrame, change: Any, kinds: tuple[type, ...] = (str,)
               ) -> pd.DataFrame:
    """A copy of `df` with `change` applied to every text (every value of `kinds`): cells,
    column and index labels."""
    import pandas as pd

    def one(value: Any) -> Any:
        return change(value) if isinstance(value, kinds) else value

    out: pd.DataFrame = df.copy()
    for i in range(out.shape[1]):
        column = out.iloc[:, i]
        if column.dtype == object or pd.api.types.is_string_dtype(column.dtype):
            out.isetitem(i, [one(v) for v in column])
    out.columns = [one(c) for c in out.columns]
    if isinstance(out.index, pd.MultiIndex):
        out.index = pd.MultiIndex.from_tuples(
            [tuple(one(v) for v in key) for key in out.index], names=out.index.names)
    else:
        out.index = pd.Index([one(v) for v in out.index], name=out.index.name)
    return out


def _table_text(value: Any) -> str:
    # (pandas shows the strings inside a mapping or list raw: their repr escapes them)
    return printable(value if isinstance(value, str) else str(value))


def _to_table(df: pd.DataFrame, **kwargs: Any) -> str:
    """`df` as a text table with control characters escaped (`printable`), also inside
    structured inputs and outputs."""
    return str(_map_texts(df, _table_text, (str, dict, list, tuple)).to_string(**kwargs))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _defuse(text: str) -> str:
    """A text a spreadsheet would run as a formula (``=HYPERLINK(...)``, ``-2+3``,
    ``@SUM(...)``) prefixed with ``'``, which makes it text (OWASP's advice)."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _to_csv(df: pd.DataFrame, index: bool, spreadsheet_safe: bool = False) -> str:
    """CSV (RFC 4180 quoting: commas, quotes and newlines inside cells survive); lists and
    mappings as JSON text rather than Python's repr. Exact unless `spreadsheet_safe`."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = [json.dumps(_plain(v)) if isinstance(v, dict | list | tuple) else v
                        for v in out[col]]
    if spreadsheet_safe:
        out = _map_texts(out, _defuse)
    # (CRLF, RFC 4180's: a cell holding a bare "\r" is quoted too — with "\n" it was not,
    # and a reader split the row there)
    return str(out.to_csv(index=index, lineterminator="\r\n"))


_SPREADSHEET_SAFE = click.option(
    "--spreadsheet-safe", is_flag=True,
    help="With --format csv: prefix texts that start with = + - @ or a tab with ' so a "
         "spreadsheet shows them rather than running them as formulas (record content "
         "comes from your app's users). Without it the CSV holds every text exactly.")


def _check_spreadsheet_safe(spreadsheet_safe: bool, fmt: str) -> None:
    if spreadsheet_safe and fmt != "csv":
        _fail("--spreadsheet-safe applies to --format csv only")


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
@click.option("--reasons", is_flag=True,
              help="Add a '<feedback> reason' column beside each status: why a result "
                   "failed or was skipped, or the judge's explanation of its score.")
@_SPREADSHEET_SAFE
def records(database_url: str | None, table_prefix: str, apps: tuple[str, ...],
            limit: int | None, offset: int, fmt: str, reasons: bool,
            spreadsheet_safe: bool) -> None:
    """Records with their feedback scores and statuses, newest first."""
    _check_spreadsheet_safe(spreadsheet_safe, fmt)
    _refuse_memory(database_url, "`scrutiny records` (it reads what apps stored)")
    session = _session(database_url, table_prefix, migrate="refuse")  # reads: creates nothing
    table = fmt == "table"
    if table and limit is None:
        limit = TABLE_LIMIT
    try:
        _check_apps(session, apps)
        # (one more than shown: a table says when there are more)
        df, _ = session.get_records_and_feedback(
            list(apps) or None, limit=None if limit is None else limit + table, offset=offset,
            reasons=reasons)
    except ScrutinyError as exc:  # (the database went away, a lock: said, not a traceback)
        _fail(str(exc), database_url)
        return
    finally:
        session.close()
    if fmt == "json":
        click.echo(_to_json(df))
    elif fmt == "csv":
        # (color=True: click strips escape sequences from a pipe, and CSV is exact text)
        click.echo(_to_csv(df, index=False, spreadsheet_safe=spreadsheet_safe), nl=False,
                   color=True)
    elif df.empty:
        click.echo("no records" + (f" after the newest {offset}" if offset else ""))
    else:
        more = limit is not None and len(df) > limit
        shown = df.iloc[:limit] if more else df
        click.echo(_to_table(shown.drop(columns=["app_id", "tags"]), max_colwidth=40))
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
@_SPREADSHEET_SAFE
def leaderboard(database_url: str | None, table_prefix: str, apps: tuple[str, ...],
                fmt: str, spreadsheet_safe: bool) -> None:
    """Mean score per app version per feedback, best first."""
    _check_spreadsheet_safe(spreadsheet_safe, fmt)
    _refuse_memory(database_url, "`scrutiny leaderboard` (it reads what apps stored)")
    session = _session(database_url, table_prefix, migrate="refuse")  # reads: creates nothing
    try:
        _check_apps(session, apps)
        board = session.get_leaderboard(list(apps) or None)
    except ScrutinyError as exc:
        _fail(str(exc), database_url)
        return
    finally:
        session.close()
    if fmt == "json":
        click.echo(_to_json(board.reset_index()))
    elif fmt == "csv":
        click.echo(_to_csv(board, index=True, spreadsheet_safe=spreadsheet_safe), nl=False,
                   color=True)
    else:
        click.echo(_to_table(board) if not board.empty else "no records")


@main.command()
@_URL
@_PREFIX
@click.option("--app", "apps", multiple=True,
              help="App id (name:version), or app name when no app has that id (repeatable).")
@click.option("--before", default=None, metavar="TIME",
              help="Records that started before this ISO 8601 time, e.g. 2026-01-01 or "
                   "2026-01-01T12:00:00+02:00 (a time without an offset is UTC).")
@click.option("--record-id", "record_ids", multiple=True,
              help="A record's id (repeatable): e.g. the records of one of your users.")
@click.option("--yes", is_flag=True, help="Delete without asking first.")
def delete(database_url: str | None, table_prefix: str, apps: tuple[str, ...],
           before: str | None, record_ids: tuple[str, ...], yes: bool) -> None:
    """Delete records and their results, for retention or a user's erasure request.

    Every condition given must hold. In an SQLite file the deleted rows are overwritten
    and its write-ahead log emptied."""
    _refuse_memory(database_url, "`scrutiny delete` (it deletes what apps stored)")
    if not (apps or before or record_ids):
        _fail("say what to delete: --app, --before and/or --record-id (nothing is deleted "
              "without a condition)")
    cutoff = None
    if before is not None:
        try:
            cutoff = datetime.fromisoformat(before)
        except ValueError:
            _fail(f"--before {before!r} is not an ISO 8601 time: use e.g. 2026-01-01 or "
                  "2026-01-01T12:00:00+00:00")
            return
        if cutoff.tzinfo is None:
            cutoff = cutoff.replace(tzinfo=timezone.utc)
    if any(not i.strip() for i in record_ids):
        _fail("--record-id is empty: give a record's id")
    said = [f"of app {', '.join(apps)}" if apps else "",
            f"that started before {cutoff.isoformat()}" if cutoff else "",
            f"with one of {len(set(record_ids))} given ids" if record_ids else ""]
    what = "the records " + " and ".join(s for s in said if s)
    try:
        if not yes and not click.confirm(f"Delete {printable(what)}?", err=True):
            _fail("nothing deleted")
    except click.Abort:  # (no answer: stdin closed)
        _fail("nothing deleted (no answer to the question; --yes deletes without asking)")
    session = _session(database_url, table_prefix, migrate="refuse")
    try:
        _check_apps(session, apps)
        ids = sorted(set(record_ids))
        found = {row["record_id"] for row in session.store.records_by_ids(ids)}
        deleted = session.delete_records(before=cutoff, app_ids=list(apps) or None,
                                         record_ids=ids or None)
    except ScrutinyError as exc:
        _fail(str(exc), database_url)
        return
    finally:
        session.close()
    click.echo(f"deleted {deleted} record(s)")
    unknown = [i for i in ids if i not in found]
    if unknown:  # (an erasure job given a mistyped id must not report success)
        click.echo(f"scrutiny: {len(unknown)} of the {len(ids)} given record ids matched "
                   f"no record: {', '.join(printable(i) for i in unknown[:10])}"
                   + (" ..." if len(unknown) > 10 else ""), err=True)
        sys.exit(1)


# ---------------------------------------------------------------------- dashboard
def _url_password(url: str) -> bool:
    """Whether `url` holds a password (``user:password@`` or ``?password=``)."""
    return bool(_url_secrets(url))


def _missing_sqlite_file(url: str) -> str | None:
    """The path of a SQLite database file that does not exist (None otherwise)."""
    import os

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # (Session says what is wrong with it)
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

    _refuse_memory(database_url, "`scrutiny dashboard` (it reads what apps stored)")
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
    except ModuleNotFoundError as exc:  # (its message names the extra, once)
        _fail(str(exc) if "scrutiny[dashboard]" in str(exc) else
              f"the dashboard needs the extra: pip install 'scrutiny[dashboard]' ({exc})")
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
        _fail(str(exc), database_url)
        return
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(f"Scrutiny dashboard: {handle.url}")
    click.echo(f"reading {shown_url(session.database_url)} (read-only); Ctrl-C stops it",
               err=True)
    while not stopping.wait(1.0) and handle.running:
        pass
    handle.stop()
    session.close()


if __name__ == "__main__":  # pragma: no cover
    main()
