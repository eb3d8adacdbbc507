"""The SQL store (SQLAlchemy 2 Core): an embedded SQLite file by default, PostgreSQL for teams.

SQLite is opened in WAL mode with a busy timeout; writes take the lock up front
(`BEGIN IMMEDIATE`) and stay short, so an application thread, the writer, a dashboard and a
second process can share one file without "database is locked".
"""

from __future__ import annotations

import contextlib
import decimal
import functools
import logging
import math
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    Numeric,
    and_,
    bindparam,
    case,
    cast,
    create_engine,
    delete,
    event,
    false,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.pool import StaticPool

from scrutiny.core._errors import ConfigurationError, StorageError
from scrutiny.core.storage._base import (
    InsertRecord,
    RecordIdTaken,
    RecordQuery,
    RenewLeases,
    ResultNameTaken,
    Row,
    UpdateResult,
    WriteOp,
    json_escaped,
    refuse_repeats,
    search_regex,
)
from scrutiny.core.storage._migrate import MigratePolicy, ensure_schema
from scrutiny.core.storage._schema import Tables, UTCDateTime, build_tables

__all__ = ["SQLStore", "redact_url"]

logger = logging.getLogger("scrutiny")

_WRITE = "scrutiny_write"


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


NUL_STAND_IN = "\ufffd"
"""What a NUL character in a text column becomes on PostgreSQL, whose text cannot hold
one: the driver refused the whole row, and the record (every record of an app whose name
held one) or the result was lost. (In JSON payloads it is escaped and kept as it is.)"""


def _dicts(rows: Any) -> list[Row]:
    """The rows of a result as dicts (a row's `_mapping` built its keys again per row: a
    third of reading 200,000 records and their results)."""
    keys = list(rows.keys())
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _without_nul(row: Row) -> Row:
    """`row` with NUL characters in its texts replaced (the same row when it has none)."""
    for value in row.values():
        if type(value) is str and "\x00" in value:
            return {k: v.replace("\x00", NUL_STAND_IN) if type(v) is str else v
                    for k, v in row.items()}
    return row


class DatabaseFileGone(StorageError):
    """The SQLite file was deleted or replaced while the session ran."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"the database file {path} was deleted or replaced while this session ran: "
            "what it stored now would go into the deleted file, lost when the session "
            "closes, so it is not stored. Start a new Session (the app again) to store in "
            "the file that is there now")


def _op_without_nul(op: WriteOp) -> WriteOp:
    """`op` with NUL characters in its texts replaced (the same op when it has none)."""
    if isinstance(op, InsertRecord):
        rows = [op.app, op.record, *op.definitions, *op.results]
        fixed = [_without_nul(row) for row in rows]
        if all(a is b for a, b in zip(rows, fixed, strict=True)):
            return op
        n = len(op.definitions)
        return InsertRecord(fixed[0], fixed[1], fixed[2:2 + n], fixed[2 + n:])
    if isinstance(op, UpdateResult):  # (the same op: whoever made it reads `refused`)
        op.values = _without_nul(op.values)
    return op


# SQLSTATEs of PostgreSQL errors after which the same write can succeed unchanged later:
# a lost or refused connection (08..., not 08P01, a protocol violation; 57P: the server
# shutting down or starting), a deadlock or serialization failure, too many connections
# or a full disk (53), a lock not granted within lock_timeout (55P03) or a statement
# cancelled by statement_timeout (57014: mostly one waiting for a lock).
_FINAL = frozenset(("done", "failed", "skipped"))

_TRANSIENT_SQLSTATES = ("08000", "08001", "08003", "08004", "08006", "08007", "57P",
                        "40001", "40P01", "53", "55P03", "57014", "25006")
"""(25006: a read-only transaction, as a server is for the seconds of a failover.)"""
_TRANSIENT_SQLITE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR")
"""(SQLITE_FULL: the disk filled, freed a moment later; SQLITE_IOERR and its extended
codes: a passing write error of the disk.)"""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _reads(what: str) -> Callable[[Callable[Concatenate[SQLStore, _P], _R]],
                                   Callable[Concatenate[SQLStore, _P], _R]]:
    """A read (or a deletion the user asked for) that fails in the database raises
    :class:`StorageError` saying what and where, the driver's error as its cause: the raw
    SQLAlchemy error reached the dashboard as a 500 with a traceback (its handler answers
    503 with the reason for a StorageError) and the command line as a traceback."""
    def wrap(method: Callable[Concatenate[SQLStore, _P], _R]
             ) -> Callable[Concatenate[SQLStore, _P], _R]:
        def run(self: SQLStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return method(self, *args, **kwargs)
            except SQLAlchemyError as exc:
                reason = getattr(exc, "orig", None) or exc
                raise StorageError(f"could not {what} {redact_url(self.url)}: "
                                   f"{str(reason).strip()}") from exc
        functools.update_wrapper(run, method)
        return run
    return wrap


_SECRET_PARAMS = re.compile(
    r"([?&](?:password|passwd|pwd|sslpassword|secret|token|api_?key|access_?key)=)[^&#]*",
    re.IGNORECASE)
# user:password@ up to the *last* @ before the path: a password holding an unescaped @
# ("p@ss") made SQLAlchemy end it at the first one, and the rest showed as the host; and
# at the start of a URL whose scheme was left out ("me:pw@host/db")
_USER_PASSWORD = re.compile(r"((?:^|://)[^:/@?#]*:)[^/?#]*@")
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@")


def redact_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs: the ``user:password@``
    part and parameters such as ``?password=`` (libpq's, psycopg's), also in a URL that
    does not parse."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # (ValueError: a port that is not a number)
        shown = url
    return _SECRET_PARAMS.sub(r"\1***", _USER_PASSWORD.sub(r"\1***@", shown))


def _check_userinfo(url: str) -> None:
    """Refuse a URL whose user or password holds an unescaped ``@``: SQLAlchemy reads the
    password up to the first one and the rest as the host, so the driver's error ("failed
    to resolve host 'ss@db'") quoted most of the password."""
    match = _USERINFO.match(url)
    if match and "@" in match.group(1):
        raise ConfigurationError(
            f"the user name or password in {redact_url(url)!r} holds an '@' (or another "
            "character URLs reserve): percent-encode it, e.g. "
            "urllib.parse.quote_plus(password) makes '@' '%40'")


def _check_file_exists(url: str) -> None:
    """With migrate='refuse' nothing is created: not even the SQLite file, which opening a
    mistyped path would (an empty database, then 'no records')."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return  # _make_engine says what is wrong with it
    database = parsed.database
    if (parsed.get_backend_name() == "sqlite" and database not in (None, "", ":memory:")
            and not str(database).startswith("file:") and not os.path.exists(database)):
        raise ConfigurationError(
            f"there is no SQLite database at {database!r}: check the path (opened with "
            "migrate='refuse', nothing is created)")


LOCK_TIMEOUT_MS = 30_000
"""PostgreSQL's lock_timeout on Scrutiny's connections when the server, the role or the URL
sets none. Without one, a row another transaction kept locked (a psql session left open, a
client idle in a transaction) made a write wait for it for ever, and every write queued
behind it: nothing more was stored. With it the write fails after this long, is retried a
while (see scrutiny.core._writer), then given up alone, logged and counted."""


def _make_engine(url: str) -> Engine:
    _check_userinfo(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # (ValueError: a port that is not a number)
        raise ConfigurationError(
            f"not a database URL: {redact_url(url)!r}; use e.g. 'sqlite:///scrutiny.sqlite' or "
            "'postgresql+psycopg://user@host/db'"
        ) from exc
    backend = parsed.get_backend_name()
    if backend == "postgres":
        raise ConfigurationError(
            f"{redact_url(url)}: write PostgreSQL URLs as 'postgresql+psycopg://user@host/db' "
            "(SQLAlchemy does not accept the 'postgres://' alias)")
    if backend not in ("sqlite", "postgresql"):
        raise ConfigurationError(
            f"{backend!r} databases are not supported: Scrutiny stores into SQLite (the "
            "default, e.g. 'sqlite:///scrutiny.sqlite') or PostgreSQL (e.g. "
            "'postgresql+psycopg://user@host/db', with pip install 'scrutiny[postgres]')")
    if backend != "sqlite":
        try:
            # (hide_parameters: a failed statement's text in a log line or an error held
            # the records' inputs and outputs — the app's users' text)
            pg_engine = create_engine(parsed, pool_pre_ping=True, pool_size=5,
                                      max_overflow=10, hide_parameters=True)
        except (ImportError, NoSuchModuleError) as exc:
            raise ConfigurationError(
                f"the database driver for {redact_url(url)} is not available ({exc}); for "
                "PostgreSQL install the extra: pip install 'scrutiny[postgres]' and use a "
                "URL like 'postgresql+psycopg://user@host/db'"
            ) from exc

        @event.listens_for(pg_engine, "connect")
        def _on_connect_pg(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                cur.execute("SELECT current_setting('lock_timeout')")
                if str(cur.fetchone()[0]) in ("0", "0ms"):  # (none set by server, role, URL)
                    cur.execute(f"SET lock_timeout = {int(LOCK_TIMEOUT_MS)}")
            finally:
                cur.close()
            dbapi_conn.commit()

        return pg_engine
    database = parsed.database
    if parsed.host:  # sqlite://my.sqlite (two slashes: a host, which SQLite has not)
        shown = f"{parsed.host}{'/' + database if database else ''}"
        raise ConfigurationError(
            f"{redact_url(url)} names no SQLite file (two slashes make {parsed.host!r} a "
            f"host): use three slashes for a file, 'sqlite:///{shown}', or four for an "
            f"absolute path, 'sqlite:////abs/path/{shown}'")
    uri = database is not None and database.startswith("file:")  # (a URI filename: SQLite's)
    in_memory = database in (None, "", ":memory:") or (
        uri and parsed.query.get("mode") == "memory")
    if not in_memory and database is not None and not uri:
        folder = os.path.dirname(os.path.abspath(database))
        if not os.path.isdir(folder):
            raise ConfigurationError(
                f"the folder of the SQLite database {database!r} does not exist: create "
                f"{folder!r} first or choose another path"
            )
    try:
        engine = create_engine(
            parsed,
            connect_args={"timeout": 30.0, "check_same_thread": False},
            poolclass=StaticPool if in_memory else None, hide_parameters=True,
        )
    except (ImportError, NoSuchModuleError) as exc:
        raise ConfigurationError(
            f"the SQLite driver of {redact_url(url)} is not available ({exc}): use "
            "'sqlite:///path/to/file.sqlite' (Python's own sqlite3 driver)") from exc
    except ValueError as exc:  # a parameter of the URL the driver reads (?timeout=abc)
        raise ConfigurationError(f"a parameter of {redact_url(url)} is not valid: {exc} "
                                 "(e.g. ?timeout=30 is seconds)") from exc

    # The URL's ?timeout= (seconds), else 30 s: the busy timeout set below replaced the
    # one the driver had been given, so a timeout in the URL was ignored.
    given = parsed.query.get("timeout", "30")
    try:
        busy_ms = int(float(given if isinstance(given, str) else given[-1]) * 1000)
    except (ValueError, OverflowError) as exc:
        raise ConfigurationError(f"a parameter of {redact_url(url)} is not valid: {exc} "
                                 "(e.g. ?timeout=30 is seconds)") from exc

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        cur.execute("PRAGMA foreign_keys=ON")
        # Deleted rows are overwritten, not just unlinked: delete_records() is how users
        # erase what their users typed, and SQLite's own default (off; some builds turn
        # it on) left it readable in the file's free space.
        cur.execute("PRAGMA secure_delete=ON")
        cur.close()
        # SQLite folds only ASCII letters in LIKE: searches with other letters fold here
        dbapi_conn.create_function(_FOLD, 1, _fold, deterministic=True)
        dbapi_conn.create_function("regexp", 2, _regexp, deterministic=True)  # (searches)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


_PRUNE_AT = 64  # (the pools hold 15 at most)


def _is_closed(dbapi_conn: Any) -> bool:
    closed = getattr(dbapi_conn, "closed", None)  # (psycopg)
    if closed is not None:
        return bool(closed)
    try:
        dbapi_conn.in_transaction  # noqa: B018  (sqlite3: raises once closed)
    except Exception:
        return True
    return False


def _close_all(connections: set[Any]) -> None:
    with _GATE:  # (the connections may be SQLite's: see _ForkGate)
        for dbapi_conn in list(connections):
            with contextlib.suppress(Exception):  # (already broken: nothing left to close)
                dbapi_conn.close()
        connections.clear()


def _let_go_late(engine: Engine) -> tuple[threading.Event, set[Any]]:
    """An event that, once set (the store closed), makes every connection handed back to
    the engine's pool be closed rather than kept; and the set of the engine's open DBAPI
    connections (for the store's finalizer).

    ``dispose()`` closes the connections in the pool only: one a thread was still using
    (a write the writer finished past close's deadline, a worker between two statements, a
    read of the dashboard) went back to the pool dispose had let go of, and stayed open
    until the garbage collector found it, where psycopg warned that it was deleted while
    still open (an error under ``-W error``), perhaps minutes later in another test.
    """
    closed = threading.Event()
    connections: set[Any] = set()

    # (dispose() carries these listeners over to the engine's new pool)
    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_conn: Any, record: Any) -> None:
        if closed.is_set() and dbapi_conn is not None:
            record.invalidate()  # closes it; a later checkout (if any) connects anew

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        if len(connections) >= _PRUNE_AT:  # (closed without an event: a failed connect)
            connections.difference_update([c for c in connections if _is_closed(c)])
        connections.add(dbapi_conn)

    @event.listens_for(engine, "close")
    def _on_close(dbapi_conn: Any, _record: Any) -> None:
        connections.discard(dbapi_conn)

    @event.listens_for(engine, "close_detached")
    def _on_close_detached(dbapi_conn: Any) -> None:
        connections.discard(dbapi_conn)

    return closed, connections


FORK_WAIT = 5.0
"""Seconds a fork waits for Scrutiny's threads to be out of SQLite (see :class:`_ForkGate`)
before it goes on regardless, with a warning."""


class _ForkGate:
    """Keeps ``os.fork()`` from copying the process while a thread of it is inside SQLite
    through Scrutiny.

    SQLite keeps process-wide mutexes (its allocator's, its table of open files) and the
    bookkeeping of its file locks in the process's memory. A child forked while the
    session's writer was writing got them copied as they were, held: its first
    ``sqlite3.connect()`` waited for good on a mutex no thread of the child would ever
    release, or every write it tried was "database is locked" for good, and its records
    were lost (gunicorn --preload, multiprocessing's fork start method, ``os.fork`` in a
    running app). Every use of a SQLite engine of this module, from taking (or making) a
    connection to handing it back to the pool, is inside this gate (``with _GATE:``). A
    fork closes it: new uses wait until the fork is done, and the fork waits (FORK_WAIT
    seconds at most) for those under way to end. The child opens it anew, with fresh locks
    (a thread may have held one at the fork), and every store lets go of the parent's
    connections (see :meth:`SQLStore.after_fork`).

    Re-entrant per thread: a thread inside that takes a second connection goes on (the
    fork waits for it: it must not wait for the fork), and so does the forking thread (a
    hook of the fork that stores something). Without a fork, entering and leaving cost a
    lock taken and released each.
    """

    def __init__(self) -> None:
        # .depth: this thread's uses under way; .clean: in the fork this thread makes,
        # none under way (the child may close the parent's connections it holds)
        self._local = threading.local()
        self._fresh(inside=0)

    def _fresh(self, *, inside: int) -> None:
        # (re-entrant: a finalizer the garbage collector runs while this thread holds it
        # may close a store's connections, through the gate)
        self._cond = threading.Condition(threading.RLock())
        self._inside = inside  # threads inside
        self._forkers: list[int] = []  # threads in a fork (between its hooks)

    def __enter__(self) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth:
            local.depth = depth + 1
            return
        with self._cond:
            if self._forkers and threading.get_ident() not in self._forkers:
                deadline = time.monotonic() + 2 * FORK_WAIT  # (a fork stuck elsewhere)
                while self._forkers and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
            self._inside += 1
            local.depth = 1

    def __exit__(self, *exc: object) -> None:
        local = self._local
        local.depth -= 1
        if local.depth:
            return
        with self._cond:
            self._inside -= 1
            if self._forkers:
                self._cond.notify_all()

    def before_fork(self) -> None:
        mine = 1 if getattr(self._local, "depth", 0) else 0  # (not waited for)
        with self._cond:
            self._forkers.append(threading.get_ident())
            deadline = time.monotonic() + FORK_WAIT
            while self._inside > mine and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            busy = self._inside - mine
        self._local.clean = busy <= 0 and not mine
        if busy > 0:
            logger.warning(
                "scrutiny: forking while %d thread(s) of this process still use SQLite "
                "after %.0f s: the child may hang or find the database locked when it "
                "uses SQLite", busy, FORK_WAIT)

    def after_fork_in_parent(self) -> None:
        self.forget_fork()
        with self._cond:
            with contextlib.suppress(ValueError):
                self._forkers.remove(threading.get_ident())
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        # (the other threads are gone; this one's own uses, if any, go on)
        self._fresh(inside=1 if getattr(self._local, "depth", 0) else 0)

    def forked_clean(self) -> bool:
        """(In a child, until its stores are reset.) Whether no use of SQLite was under
        way in the parent at the fork: every connection the child has a copy of was idle
        in its pool."""
        return bool(getattr(self._local, "clean", False))

    def forget_fork(self) -> None:
        self._local.clean = False  # (a later fork without the hooks: unknown)


_GATE = _ForkGate()
_STORES: weakref.WeakSet[SQLStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    _GATE.after_fork_in_child()
    for store in list(_STORES):
        try:
            store.after_fork()
        except Exception:  # (never in the way of the child)
            logger.debug("scrutiny: resetting a store in a forked child failed",
                         exc_info=True)
    _GATE.forget_fork()


if hasattr(os, "register_at_fork"):  # (once: at the module's import)
    os.register_at_fork(before=_GATE.before_fork, after_in_parent=_GATE.after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


_FOLD = "scrutiny_fold"


def _fold(text: str | None) -> str | None:
    return None if text is None else text.casefold()


def _regexp(pattern: str, text: str | None) -> bool:
    """SQLite's REGEXP (it has none of its own)."""
    return text is not None and _compiled(pattern).search(text) is not None


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


class SQLStore:
    """Records and results in any database SQLAlchemy supports (SQLite and PostgreSQL tested).

    Args:
        url: a SQLAlchemy database URL.
        table_prefix: prefix of every table and index name.
        migrate: ``"upgrade"`` brings an older (or empty) database to the newest schema
            on open; ``"refuse"`` raises :class:`ConfigurationError` instead, for teams
            that run ``scrutiny db upgrade`` themselves.
    """

    def __init__(self, url: str, *, table_prefix: str = "scrutiny_",
                 migrate: MigratePolicy = "upgrade"):
        if not (table_prefix.replace("_", "").isalnum() and table_prefix.isascii()
                and not table_prefix[0].isdigit()):
            raise ConfigurationError(
                f"table_prefix {table_prefix!r} must start with a letter or '_' and hold "
                "only ASCII letters, digits and '_' (it begins every table name)"
            )
        if migrate == "refuse":
            _check_file_exists(url)
        self.url = url
        self.prefix = table_prefix
        self.tables: Tables = build_tables(table_prefix)
        self.engine = _make_engine(url)
        self._closed, self._connections = _let_go_late(self.engine)
        # A store dropped without close() (its session never closed) closes its connections
        # when it is collected (not at exit: open sessions close then, first). The finalizer
        # holds the connections, not the engine: holding the engine kept its ~10,000 objects
        # for one more pass of the garbage collector.
        self._finalizer = weakref.finalize(self, _close_all, self._connections)
        self._finalizer.atexit = False
        self._dialect = self.engine.dialect.name
        # Every use of a SQLite engine is inside the fork gate (see _ForkGate): one through
        # self.engine that is not (a new one: use self._connect()) can hang a forked child.
        self._gate: contextlib.AbstractContextManager[Any] = (
            _GATE if self._dialect == "sqlite" else contextlib.nullcontext())
        self._pid = os.getpid()
        _STORES.add(self)
        self.found_revision: str | None = None
        self._compiled: dict[tuple[Any, ...],
                             tuple[str, list[str], dict[str, Any], list[int], bool]] = {}
        self._multirow = self._dialect == "sqlite"
        self._multi_sql: dict[tuple[Any, ...], str] = {}
        # SQLite 3.38+ (JSON ->> operator, UPDATE FROM): a batch is one statement.
        self._one_statement = self._multirow and sqlite3.sqlite_version_info >= (3, 38, 0)
        self._batch_view = f"{table_prefix}write_batch"
        self._contended_until = 0.0  # a recent write mostly waited (see _note_contention)
        self._date_columns: dict[str, tuple[str, ...]] = {}
        self._known_apps: set[str] = set()  # rows this store has written (skip re-inserts)
        # per feedback id, the (higher_is_better, spec_json) this store last wrote: the id
        # does not cover them, so a definition is written again only when they changed
        self._known_definitions: dict[str, tuple[bool, str | None]] = {}
        self._create_schema(migrate)
        self._file = self._file_identity()  # (see _check_file)
        self._file_gone = False

    def _file_identity(self) -> tuple[str, int, int] | None:
        """(path, device, inode) of a SQLite database file; None for other databases."""
        database = self.engine.url.database
        if self._dialect != "sqlite" or not database or database == ":memory:" or \
                database.startswith("file:"):
            return None
        path = os.path.abspath(database)
        try:
            found = os.stat(path)
        except OSError:
            return None
        return path, found.st_dev, found.st_ino

    def _check_file(self, known: tuple[str, int, int]) -> None:
        """(Before a write: one stat.) Refuse the write when the SQLite file was deleted
        or replaced while the session ran. SQLite went on writing into the deleted file
        through the open connections, every result was reported stored, and all of it
        was gone when they closed."""
        if not self._file_gone:
            try:
                found = os.stat(known[0])
                if (found.st_dev, found.st_ino) == known[1:]:
                    return
            except OSError:
                pass
            self._file_gone = True
        raise DatabaseFileGone(known[0])

    def _create_schema(self, policy: MigratePolicy) -> None:
        try:
            with self._gate:
                self.found_revision = ensure_schema(self.engine, {_WRITE: True},
                                                    self.prefix, policy)
        except ConfigurationError:
            with self._gate:
                self.engine.dispose()
            raise
        except StorageError as exc:  # (kept out by other connections' locks: it says why)
            with self._gate:
                self.engine.dispose()
            raise StorageError(f"could not open or migrate {redact_url(self.url)}: {exc}") \
                from exc.__cause__
        except SQLAlchemyError as exc:
            with self._gate:
                self.engine.dispose()
            raise StorageError(
                f"could not open or migrate {redact_url(self.url)}: {exc}"
                f"{self._readonly_hint(exc)}") from exc

    def _readonly_hint(self, exc: Exception) -> str:
        """What to do when SQLite cannot write: the file, or (WAL mode writes '-wal' and
        '-shm' files beside it) its folder."""
        database = self.engine.url.database
        said = str(exc)
        if self._dialect != "sqlite" or not database or database.startswith("file:") or (
                "readonly" not in said and "unable to open" not in said):
            return ""
        folder = os.path.dirname(os.path.abspath(database))
        read_only = (f"; to read it only, open 'sqlite:///file:{os.path.abspath(database)}"
                     "?mode=ro&immutable=1&uri=true'")
        if not os.access(folder, os.W_OK):
            return (f" — the folder {folder!r} is not writable, and SQLite (in WAL mode) "
                    "keeps its '-wal' and '-shm' files beside the database: make the folder "
                    f"writable or use a database in a writable folder{read_only}")
        if "readonly" in said or (os.path.exists(database)
                                  and not os.access(database, os.W_OK)):
            return (f" — the file {database!r} is not writable: make it writable or use "
                    f"another file{read_only}")
        return ""

    def transient(self, exc: BaseException) -> bool:
        """Whether a write that failed with `exc` can succeed unchanged later, though the
        database answers: a lock it waited for past lock_timeout or statement_timeout
        (a migration, VACUUM FULL, a long transaction holding the table), a deadlock, too
        many connections, a connection lost or refused, SQLite's file locked past its busy
        timeout, the disk full or failing a write for a moment, a server read-only during a
        failover. Such a write is held and retried (as in an outage), not given up: one
        item at a time, each tried once, a second's full disk lost every record written
        meanwhile."""
        if isinstance(exc, StorageError) and exc.__cause__ is not None:
            exc = exc.__cause__  # (a read's, see _reads)
        if getattr(exc, "connection_invalidated", False):
            return True  # (SQLAlchemy found the connection dead: "server closed the
            # connection unexpectedly", the answer to a COMMIT lost on the way)
        # (the driver's own error when a write went to its connection directly, as
        # SQLite's one-statement batches do: a full disk there was taken for a refusal
        # for good, and the records written meanwhile were lost)
        orig = getattr(exc, "orig", None) or exc
        state = getattr(orig, "sqlstate", None)
        if isinstance(state, str):
            return state.startswith(_TRANSIENT_SQLSTATES)
        if isinstance(orig, sqlite3.OperationalError):
            return "locked" in str(orig) or "disk is full" in str(orig) or str(
                getattr(orig, "sqlite_errorname", "")).startswith(_TRANSIENT_SQLITE)
        return False

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A connection of the engine, inside the fork gate (see _ForkGate) from its
        checkout (or making) to its return to the pool."""
        with self._gate, self.engine.connect() as conn:
            yield conn

    def ping(self) -> bool:
        """Whether the database answers a trivial query now."""
        try:
            with self._connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except SQLAlchemyError:
            return False

    # ------------------------------------------------------------------ writes
    def write(self, ops: Sequence[WriteOp]) -> None:
        t = self.tables
        if self._file is not None:
            self._check_file(self._file)
        if self._dialect == "postgresql":
            ops = [_op_without_nul(op) for op in ops]
        apps: dict[str, Row] = {}
        definitions: dict[str, Row] = {}
        records: list[Row] = []
        results: list[Row] = []
        updates: list[UpdateResult] = []
        renewals: list[RenewLeases] = []
        for op in ops:
            if isinstance(op, RenewLeases):
                renewals.append(op)
            elif isinstance(op, InsertRecord):
                apps.setdefault(op.app["app_id"], op.app)
                for d in op.definitions:  # (the latest in the batch says what it is now)
                    definitions[d["feedback_id"]] = d
                records.append(op.record)
                results.extend(op.results)
            else:
                op.refused, op.stored = False, None  # (a batch written again)
                updates.append(op)
        refuse_repeats(records, results)
        new_apps = [a for k, a in apps.items() if k not in self._known_apps]
        known = self._known_definitions
        new_definitions = [d for k, d in definitions.items()
                           if known.get(k) != (d["higher_is_better"], d.get("spec_json"))]
        rows = len(records) + len(results) + len(updates)
        if (self._one_statement and not new_apps and not new_definitions and not renewals
                and (rows <= self._ONE_STATEMENT_ROWS
                     or (self._contended and rows <= self._CONTENDED_ROWS))):
            wall, cpu = time.perf_counter(), time.thread_time()
            if self._write_one_statement(records, results, updates):
                self._note_contention(wall, cpu)
                return
        wall, cpu = time.perf_counter(), time.thread_time()
        with self._connect() as conn:
            conn = conn.execution_options(**{_WRITE: True})
            with conn.begin():
                if new_apps:
                    self._insert_missing(conn, t.apps, "app_id", new_apps)
                if new_definitions:
                    self._insert_missing(conn, t.definitions, "feedback_id", new_definitions)
                    # The id covers name, code and wiring, not the direction or the options:
                    # the latest definition of it says what they are now (a feedback changed
                    # to higher_is_better=False kept ranking the old way in other readers).
                    conn.execute(
                        update(t.definitions)
                        .where(t.definitions.c.feedback_id == bindparam("w_id"))
                        .values(higher_is_better=bindparam("w_higher"),
                                spec_json=bindparam("w_spec")),
                        [{"w_id": d["feedback_id"], "w_higher": d["higher_is_better"],
                          "w_spec": d.get("spec_json")} for d in new_definitions])
                # (a stored record given again, with more feedbacks: kept — but not another
                # app's record, or another call's, under the same id)
                if records and self._insert_rows(conn, t.records, records,
                                                 keep_existing=True) < len(records):
                    self._check_record_ids(conn, records)
                    self._check_result_names(conn, results)
                if results:  # (a batch retried after its commit's answer was lost:
                    # its rows are there already, and a duplicate key lost it for good)
                    self._insert_rows(conn, t.results, results, keep_existing=True)
                updated = self._apply_updates(conn, updates)
                for r in renewals:
                    self._renew(conn, r)
        if updated < len(updates):
            self._note_refused(updates)
        self._known_apps.update(a["app_id"] for a in new_apps)
        known.update((d["feedback_id"], (d["higher_is_better"], d.get("spec_json")))
                     for d in new_definitions)
        self._note_contention(wall, cpu)

    def _renew(self, conn: Connection, renewal: RenewLeases) -> None:
        """Extend the leases `renewal` names, skipping (on PostgreSQL) the rows another
        transaction holds locked: one row locked for good (a transaction left open on it)
        made the whole renewal wait for it, or fail past lock_timeout — every other lease
        ran out and workers took over results still being evaluated here, while the
        writer (whose thread renews) stored nothing. SQLite has no row locks: the writer
        holds the whole database while it writes."""
        t = self.tables.results
        held = and_(t.c.worker_id == renewal.worker_id,
                    t.c.status.in_(("pending", "running")))
        ids = renewal.result_ids
        for chunk in [None] if ids is None else _chunks(list(ids), 500):
            where = held if chunk is None else and_(held, t.c.result_id.in_(chunk))
            if self._dialect == "postgresql":
                where = t.c.result_id.in_(select(t.c.result_id).where(where)
                                          .with_for_update(skip_locked=True)
                                          .scalar_subquery())
            conn.execute(update(t).where(where).values(lease_expires_at=renewal.expires_at))

    def _note_contention(self, wall: float, cpu: float) -> None:
        """Whether the write that began at (`wall`, `cpu`) spent most of its time waiting
        (for the GIL, mostly) rather than working."""
        now = time.perf_counter()
        if (now - wall) - (time.thread_time() - cpu) > self._CONTENDED_WAIT:
            self._contended_until = now + self._CONTENDED_FOR

    @property
    def _contended(self) -> bool:
        return time.perf_counter() < self._contended_until

    # SQLite releases the GIL around every prepare, step and reset of a statement, and a
    # thread that gives the GIL away waits up to a switch interval (5 ms) to get it back
    # while the application's thread is busy: BEGIN, two INSERTs, an UPDATE and COMMIT cost
    # about fifteen such waits. Written as one INSERT into a view whose INSTEAD OF trigger
    # inserts and updates the real tables from a JSON payload, a batch is one statement of
    # constant text (prepared once per connection), atomic on its own, with its rows parsed
    # by SQLite outside the GIL: about three waits. SQLite's JSON parsing costs more than
    # binding the rows (1.3x for one record, 1.75x for 256, without contention), so only
    # small batches — an interactive app's, where the waits dominate — go this way; bulk
    # batches (ingest at full speed, workers) keep the multi-row statements — unless the last
    # write in the last _CONTENDED_FOR seconds spent more than _CONTENDED_WAIT seconds waiting
    # rather than working: then the application is keeping the GIL busy, each of the general
    # path's dozen or more waits costs up to a switch interval, and JSON parsed outside the
    # GIL is the cheaper way.
    _ONE_STATEMENT_ROWS = 16
    _CONTENDED_ROWS = 4096
    _CONTENDED_WAIT = 0.01
    _CONTENDED_FOR = 1.0
    def _write_one_statement(self, records: list[Row], results: list[Row],
                             updates: list[UpdateResult]) -> bool:
        """Write the batch as one statement; False when it needs the general path."""
        if len({u.result_id for u in updates}) != len(updates):
            return False  # the same result twice: the updates must apply in order
        t = self.tables
        try:
            payload = orjson.dumps({
                "r": [self._sqlite_values(t.records, row) for row in records],
                "p": [self._sqlite_values(t.results, row) for row in results],
                "u": [{"id": u.result_id, "tok": u.lease_token,
                       "from": "," + ",".join(u.from_statuses) + ",",
                       "v": self._sqlite_values(t.results, u.values)} for u in updates],
            }).decode()
        except TypeError:
            return False  # a value orjson does not know: the general path binds it
        if "\\u0000" in payload:
            # SQLite's JSON extraction cuts text at a NUL character: a name, an error or an
            # explanation holding one would be stored cut (and an app id that no longer
            # matches its row loses the record). The general path binds it whole.
            return False
        with self._connect() as conn:
            proxied = conn.connection
            raw = proxied.driver_connection
            assert raw is not None
            if not proxied.info.get(self._batch_view):
                for ddl in self._batch_ddl():
                    raw.execute(ddl)
                proxied.info[self._batch_view] = True
            before = raw.total_changes  # (the trigger's inserts and updates count too)
            try:
                raw.execute(f"INSERT INTO temp.{self._batch_view} (payload) VALUES (?)",
                            (payload,))
            except sqlite3.IntegrityError as exc:
                if str(exc) in (RecordIdTaken.MARK, ResultNameTaken.MARK):
                    # (nothing was written: the general path's checks name the record and
                    # the feedback, and say what to do)
                    return False
                raise
            changed = raw.total_changes - before
        if updates and changed < len(records) + len(results) + len(updates):
            self._note_refused(updates)  # (or a record given again: kept, not counted)
        return True

    def _check_record_ids(self, conn: Connection, records: list[Row]) -> None:
        """(Some records of the batch were there already.) Raise RecordIdTaken when one of
        them is another record: another app's, or one that started at another time. Its
        insert was skipped and its results were stored under the record already there (a
        record id reused by two processes: the other app's scores, and none for this one).
        """
        t = self.tables.records
        given = {r["record_id"]: r for r in records}
        with_key = select(t.c.record_id, t.c.app_id, t.c.start_time)
        for chunk in _chunks(list(given), 500):
            for row in conn.execute(with_key.where(t.c.record_id.in_(chunk))):
                new = given[row.record_id]
                if row.app_id != new["app_id"] or row.start_time != new["start_time"]:
                    raise RecordIdTaken(row.record_id, row.app_id, new["app_id"])

    def _check_result_names(self, conn: Connection, results: list[Row]) -> None:
        """(Some records of the batch were there already: given again.) Raise
        ResultNameTaken when a new result has the name of a result the record has."""
        t = self.tables.results
        given = {(r["record_id"], r["feedback_name"]): r["result_id"] for r in results}
        ids = sorted({record_id for record_id, _ in given})
        stored = select(t.c.record_id, t.c.feedback_name, t.c.result_id)
        for chunk in _chunks(ids, 500):
            for row in conn.execute(stored.where(t.c.record_id.in_(chunk))):
                new = given.get((row.record_id, row.feedback_name))
                if new is not None and new != row.result_id:
                    raise ResultNameTaken(row.record_id, row.feedback_name)

    def _note_refused(self, updates: list[UpdateResult]) -> None:
        """(Fewer rows changed than written, once committed.) Mark the updates that did not
        apply, with the row as it is stored instead: an update that matched no row — a
        lease that ran out, taken over by a worker; a deleted record — was taken for
        stored, and its waiters were told an end state the database does not hold."""
        t = self.tables.results
        rows: dict[str, Row] = {}
        with self._snapshot() as conn:
            for chunk in _chunks(list({u.result_id for u in updates}), 500):
                rows.update((r.result_id, dict(r._mapping)) for r in conn.execute(
                    select(t).where(t.c.result_id.in_(chunk))))
        for u in updates:
            row = rows.get(u.result_id)
            if row is None or any(row.get(k) != u.values[k] for k in ("status", "updated_at")
                                  if k in u.values):
                u.refused, u.stored = True, row

    def _sqlite_values(self, table: Any, row: Row) -> Row:
        """`row` with its datetimes as SQLite's stored text."""
        dates = self._date_columns.get(table.name)
        if dates is None:
            dates = self._date_columns[table.name] = tuple(
                c.name for c in table.columns if isinstance(c.type, UTCDateTime))
        text = UTCDateTime.sqlite_text
        out = dict(row)
        for name in dates:
            value = out.get(name)
            if value is not None:
                out[name] = text(value)
        return out

    def _batch_ddl(self) -> list[str]:
        t = self.tables
        view = self._batch_view

        def insert(table: Any, key: str, keep_existing: bool = False) -> str:
            names = [c.name for c in table.columns]
            values = ", ".join(f"value ->> '$.{n}'" for n in names)
            # ("WHERE true": SQLite's parser needs it before an upsert clause after SELECT)
            key_names = ", ".join(c.name for c in table.primary_key.columns)
            keep = (f" WHERE true ON CONFLICT ({key_names}) DO NOTHING" if keep_existing
                    else "")
            return (f"INSERT INTO {table.name} ({', '.join(names)}) "
                    f"SELECT {values} FROM json_each(NEW.payload, '$.{key}'){keep};")

        res = t.results.name
        settable = [c.name for c in t.results.columns if not c.primary_key]
        sets = ", ".join(
            f"{n} = CASE WHEN json_type(u.value, '$.v.{n}') IS NULL THEN {res}.{n} "
            f"ELSE u.value ->> '$.v.{n}' END" for n in settable)
        update = (f"UPDATE {res} SET {sets} FROM json_each(NEW.payload, '$.u') AS u "
                  f"WHERE {res}.result_id = u.value ->> '$.id' "
                  f"AND instr(u.value ->> '$.from', ',' || {res}.status || ',') > 0 "
                  f"AND (u.value ->> '$.tok' IS NULL "
                  f"OR {res}.lease_token = u.value ->> '$.tok');")
        rec = t.records.name
        # (see _check_record_ids; start times are stored as text of one format)
        taken = (f"SELECT RAISE(ABORT, '{RecordIdTaken.MARK}') FROM json_each(NEW.payload, "
                 f"'$.r') AS j JOIN {rec} ON {rec}.record_id = j.value ->> '$.record_id' "
                 f"WHERE {rec}.app_id IS NOT j.value ->> '$.app_id' "
                 f"OR {rec}.start_time IS NOT j.value ->> '$.start_time';")
        # (see _check_result_names: one probe of the record's index per new result)
        named = (f"SELECT RAISE(ABORT, '{ResultNameTaken.MARK}') FROM json_each(NEW.payload, "
                 f"'$.p') AS j JOIN {res} ON {res}.record_id = j.value ->> '$.record_id' "
                 f"WHERE {res}.feedback_name = j.value ->> '$.feedback_name' "
                 f"AND {res}.result_id IS NOT j.value ->> '$.result_id';")
        return [
            f"CREATE TEMP VIEW IF NOT EXISTS {view} (payload) AS SELECT NULL",
            f"CREATE TEMP TRIGGER IF NOT EXISTS {view}_insert INSTEAD OF INSERT ON {view} "
            f"BEGIN {taken} {named} {insert(t.records, 'r', keep_existing=True)} "
            f"{insert(t.results, 'p')} {update} END",
        ]

    def _apply_updates(self, conn: Connection, updates: list[UpdateResult]) -> int:
        """Apply result updates, one executemany per shape of update; returns how many rows
        they changed."""
        t = self.tables.results
        groups: dict[tuple[tuple[str, ...], tuple[str, ...], bool], list[Row]] = {}
        for u in updates:
            key = (tuple(sorted(u.values)), u.from_statuses, u.lease_token is not None)
            params = {f"v_{k}": v for k, v in u.values.items()}
            params["w_result_id"] = u.result_id
            if u.lease_token is not None:
                params["w_lease_token"] = u.lease_token
            groups.setdefault(key, []).append(params)
        changed = 0
        for (columns, from_statuses, guarded), rows in groups.items():
            if self._multirow and len(rows) > 1 and len(
                    {r["w_result_id"] for r in rows}) == len(rows):
                try:
                    changed += self._update_multirow(conn, columns, from_statuses, guarded,
                                                     rows)
                    continue
                except OperationalError as exc:  # SQLite older than 3.33: no UPDATE FROM
                    if "syntax" not in str(exc):
                        raise
                    self._multirow = False
            stmt = (update(t)  # no IN (...): executemany cannot expand it
                    .where(t.c.result_id == bindparam("w_result_id"))
                    .where(or_(*(t.c.status == status for status in from_statuses))))
            if guarded:
                stmt = stmt.where(t.c.lease_token == bindparam("w_lease_token"))
            stmt = stmt.values({c: bindparam(f"v_{c}") for c in columns})
            changed += self._executemany(conn, ("update", columns, from_statuses, guarded),
                                         stmt, rows)
        return changed

    # SQLite releases the GIL around every statement step, and a thread that gives the GIL
    # away waits up to a switch interval (5 ms) to get it back while the application's
    # thread is busy: an executemany of N rows is N such waits. So on SQLite a batch is
    # written as one multi-row statement per table and per shape of update.
    _MAX_VARIABLES = 30_000

    def _insert_rows(self, conn: Connection, table: Any, rows: list[Row], *,
                     keep_existing: bool = False) -> int:
        """Insert `rows`; with `keep_existing`, a row whose key is already there is left
        as it is (not an error). Returns how many were inserted."""
        if not self._multirow or len(rows) == 1:
            stmt = table.insert()
            if keep_existing and self._dialect in ("sqlite", "postgresql"):
                from sqlalchemy.dialects import postgresql, sqlite

                dialect_insert = sqlite.insert if self._dialect == "sqlite" else \
                    postgresql.insert
                stmt = dialect_insert(table).on_conflict_do_nothing(
                    index_elements=[c.name for c in table.primary_key.columns])
            return self._executemany(conn, ("insert", table.name, keep_existing), stmt, rows)
        names = list(rows[0].keys())
        per_chunk = max(1, self._MAX_VARIABLES // len(names))
        text = UTCDateTime.sqlite_text
        dates = {n for n in names if isinstance(table.c[n].type, UTCDateTime)}
        inserted = 0
        for start in range(0, len(rows), per_chunk):
            chunk = rows[start:start + per_chunk]
            key = ("insert-multi", table.name, tuple(names), len(chunk), keep_existing)
            sql = self._multi_sql.get(key)
            if sql is None:
                row_marks = "(" + ", ".join("?" * len(names)) + ")"
                # ON CONFLICT on the key only: OR IGNORE would also drop, unsaid, a row
                # that breaks any other constraint
                keep = (f" ON CONFLICT ({', '.join(c.name for c in table.primary_key.columns)})"
                        " DO NOTHING") if keep_existing else ""
                sql = self._multi_sql[key] = (
                    f"INSERT INTO {table.name} ({', '.join(names)}) VALUES "
                    + ", ".join([row_marks] * len(chunk)) + keep)
            params: list[Any] = []
            values_of = itemgetter(*names)  # one C call per row instead of one per value
            date_at = [i for i, n in enumerate(names) if n in dates]
            for row in chunk:
                values = list(values_of(row)) if len(names) > 1 else [row[names[0]]]
                for i in date_at:
                    if values[i] is not None:
                        values[i] = text(values[i])
                params.extend(values)
            inserted += conn.exec_driver_sql(sql, tuple(params)).rowcount
        return inserted

    def _update_multirow(self, conn: Connection, columns: tuple[str, ...],
                         from_statuses: tuple[str, ...], guarded: bool,
                         rows: list[Row]) -> int:
        t = self.tables.results
        cte = ["w_result_id", "w_lease_token", *(f"v_{c}" for c in columns)]
        per_chunk = max(1, self._MAX_VARIABLES // len(cte))
        text = UTCDateTime.sqlite_text
        dates = {f"v_{c}" for c in columns if isinstance(t.c[c].type, UTCDateTime)}
        statuses = ", ".join(f"'{st}'" for st in from_statuses)  # our own constants
        changed = 0
        for start in range(0, len(rows), per_chunk):
            chunk = rows[start:start + per_chunk]
            key = ("update-multi", columns, from_statuses, guarded, len(chunk))
            sql = self._multi_sql.get(key)
            if sql is None:
                row_marks = "(" + ", ".join("?" * len(cte)) + ")"
                sets = ", ".join(f"{c} = u.v_{c}" for c in columns)
                guard = f" AND {t.name}.lease_token = u.w_lease_token" if guarded else ""
                sql = self._multi_sql[key] = (
                    f"WITH u({', '.join(cte)}) AS (VALUES "
                    + ", ".join([row_marks] * len(chunk))
                    + f") UPDATE {t.name} SET {sets} FROM u WHERE "
                    f"{t.name}.result_id = u.w_result_id AND {t.name}.status IN "
                    f"({statuses}){guard}")
            params: list[Any] = []
            for row in chunk:
                for n in cte:
                    v = row.get(n)
                    params.append(text(v) if v is not None and n in dates else v)
            changed += conn.exec_driver_sql(sql, tuple(params)).rowcount
        return changed

    def _executemany(self, conn: Connection, key: tuple[Any, ...], stmt: Any,
                     rows: list[Row]) -> int:
        """Run `stmt` once per row through the driver's executemany; returns the rows
        changed.

        The statement is compiled once per shape; rows go to the driver as they are, with
        datetimes turned into SQLite's stored text here — SQLAlchemy's per-value bind
        processing cost more than the database itself on the writer's hot path (records,
        results and their updates). PostgreSQL's driver takes the aware datetimes as they
        are.
        """
        names = tuple(rows[0].keys())
        cache_key = (*key, names)
        entry = self._compiled.get(cache_key)
        if entry is None:
            compiled = stmt.compile(dialect=self.engine.dialect, column_keys=list(names))
            defaults = compiled.params  # rendered bind name -> value (literals included)
            order = list(compiled.positiontup) if compiled.positional else list(defaults)
            fixed = {k: v for k, v in defaults.items() if k not in names}
            table = stmt.table
            dates = [i for i, n in enumerate(order) if n in names and isinstance(
                getattr(table.c.get(n.removeprefix("v_")), "type", None), UTCDateTime)]
            entry = self._compiled[cache_key] = (str(compiled), order, fixed,
                                                 dates if self._dialect == "sqlite" else [],
                                                 compiled.positional)
        sql, order, fixed, dates, positional = entry
        text = UTCDateTime.sqlite_text
        params: list[Any] = []
        for row in rows:
            values = [row[n] if n in row else fixed[n] for n in order]
            for i in dates:
                if values[i] is not None:
                    values[i] = text(values[i])
            params.append(tuple(values) if positional else dict(zip(order, values,
                                                                       strict=True)))
        return int(conn.exec_driver_sql(sql, params).rowcount)

    @_reads("read results from")
    def results_final(self, result_ids: Sequence[str]) -> tuple[list[Row], set[str]]:
        """The rows of those of these results that have an end state, and the ids of those
        that are not stored (yet, or any more)."""
        t = self.tables.results
        out: list[Row] = []
        missing = set(result_ids)
        with self._connect() as conn, conn.begin():
            for chunk in _chunks(list(result_ids), 500):
                for r in conn.execute(select(t).where(t.c.result_id.in_(chunk))):
                    missing.discard(r.result_id)
                    if r.status in _FINAL:
                        out.append(dict(r._mapping))
        return out, missing

    def _insert_missing(self, conn: Connection, table: Any, key: str, rows: list[Row]) -> None:
        if self._dialect == "sqlite":
            from sqlalchemy.dialects import sqlite

            conn.execute(sqlite.insert(table).on_conflict_do_nothing(index_elements=[key]),
                         rows)
            return
        if self._dialect == "postgresql":
            from sqlalchemy.dialects import postgresql

            conn.execute(postgresql.insert(table).on_conflict_do_nothing(
                index_elements=[key]), rows)
            return
        existing = set(conn.execute(
            select(table.c[key]).where(table.c[key].in_([r[key] for r in rows]))
        ).scalars())
        missing = [r for r in rows if r[key] not in existing]
        if missing:
            conn.execute(table.insert(), missing)

    # ------------------------------------------------------------------ reads
    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read transaction whose statements all see the database as it was at its first
        one. PostgreSQL's default (READ COMMITTED) gives each statement its own view: a
        page of records read in one statement and their results in the next, while apps
        stored newer records, came back with some records' results missing (shown "n/a").
        SQLite's read transactions are snapshots already."""
        with self._connect() as conn, conn.begin():
            if self._dialect == "postgresql":
                conn.exec_driver_sql(
                    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield conn

    reads_columns = True
    """`records_and_results` and `query_records` take `record_columns` / `result_columns`:
    the columns to read (None: all); `records_and_results_in_pages` reads in pages."""

    @staticmethod
    def _picked(table: Any, names: Sequence[str] | None) -> list[Any]:
        """The columns of `table` named (every one for None)."""
        if names is None:
            return list(table.c)
        unknown = [n for n in names if n not in table.c]
        if unknown:
            raise ValueError(f"no column(s) {unknown} in {table.name}")
        return [table.c[n] for n in names]

    @_reads("read records from")
    def records_and_results(
        self,
        *,
        app_ids: Sequence[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        record_columns: Sequence[str] | None = None,
        result_columns: Sequence[str] | None = None,
    ) -> tuple[list[Row], list[Row]]:
        """With `record_columns` / `result_columns`, only those columns are read (the
        table's: every column, span trees included, was read and made a dict per row,
        for a table that shows none of them: 200,000 records took 1.7 GB). Results come
        oldest first (by created_at, then result_id)."""
        t = self.tables
        order = (t.records.c.start_time.desc(), t.records.c.record_id)
        query = select(*self._picked(t.records, record_columns)).order_by(*order)
        ids_query = select(t.records.c.record_id).order_by(*order)
        where = self._app_filter(app_ids)
        if where is not None:
            query = query.where(where)
            ids_query = ids_query.where(where)
        if limit is not None:
            query = query.limit(limit)
            ids_query = ids_query.limit(limit)
        if offset:
            query = query.offset(offset)
            ids_query = ids_query.offset(offset)
        results_query = select(*self._picked(t.results, result_columns)).where(
            t.results.c.record_id.in_(select(ids_query.subquery().c.record_id))
        ).order_by(t.results.c.created_at, t.results.c.result_id)  # (oldest first)
        with self._snapshot() as conn:
            records = _dicts(conn.execute(query))
            results = _dicts(conn.execute(results_query))
        return records, results

    @_reads("read records from")
    def records_and_results_in_pages(
        self,
        each: Callable[[list[Row], list[Row]], object],
        *,
        app_ids: Sequence[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        record_columns: Sequence[str] | None = None,
        result_columns: Sequence[str] | None = None,
        page: int = 5000,
    ) -> None:
        """As :meth:`records_and_results`, handing `each` a page of up to `page` records
        (newest first) and their results at a time, all read in one snapshot: reading
        every record at once held a dict per row of every record and result beside the
        table made of them (200,000 records: 0.9 GB for a 171 MB frame)."""
        t = self.tables
        query = select(*self._picked(t.records, record_columns)).order_by(
            t.records.c.start_time.desc(), t.records.c.record_id)
        where = self._app_filter(app_ids)
        if where is not None:
            query = query.where(where)
        if limit is not None:
            query = query.limit(limit)
        if offset:
            query = query.offset(offset)
        results_query = select(*self._picked(t.results, result_columns)).order_by(
            t.results.c.created_at, t.results.c.result_id)  # (oldest first)
        with self._snapshot() as conn:
            rows = conn.execution_options(stream_results=True, yield_per=page).execute(query)
            keys = list(rows.keys())
            for part in rows.partitions(page):
                records = [dict(zip(keys, row, strict=True)) for row in part]
                ids = [rec["record_id"] for rec in records]
                results: list[Row] = []
                for chunk in _chunks(ids, self._in_list_most()):
                    results += _dicts(conn.execute(
                        results_query.where(t.results.c.record_id.in_(chunk))))
                each(records, results)

    def _in_list_most(self) -> int:
        """The most values an IN list of one read takes here (SQLite before 3.32 took
        999 variables; 500 a statement made 400 for 200,000 records)."""
        if self._dialect == "sqlite" and sqlite3.sqlite_version_info < (3, 32):
            return 500
        return 5000

    @_reads("read a record from")
    def record(self, record_id: str) -> tuple[Row | None, list[Row]]:
        t = self.tables
        [record_id] = self._texts([record_id])
        with self._snapshot() as conn:
            row = conn.execute(
                select(t.records).where(t.records.c.record_id == record_id)
            ).first()
            results = [
                dict(r._mapping)
                for r in conn.execute(
                    select(t.results).where(t.results.c.record_id == record_id)
                    .order_by(t.results.c.created_at, t.results.c.result_id)  # (oldest first)
                )
            ]
        return (dict(row._mapping) if row is not None else None), results

    def _texts(self, values: Sequence[str]) -> list[str]:
        """Filter values as they are stored (on PostgreSQL, a NUL as NUL_STAND_IN): a NUL
        in a filter made the driver raise rather than find nothing, or what was stored
        with one."""
        if self._dialect != "postgresql":
            return list(values)
        return [v.replace("\x00", NUL_STAND_IN) if isinstance(v, str) else v
                for v in values]

    def _app_filter(self, app_ids: Sequence[str] | None) -> Any:
        """Records of these apps: a value is an app id when some app has that id, and
        otherwise an app name (all its versions). "team:qa" is app "team" version "qa",
        not the versions of an app named "team:qa" (whose ids are "team\\:qa:...")."""
        t = self.tables.records
        if app_ids is None:
            return None
        if not app_ids:  # (an empty selection selects nothing: it deleted every app's)
            return false()
        ids = list(dict.fromkeys(self._texts(app_ids)))
        apps = self.tables.apps
        taken = select(apps.c.app_id).where(apps.c.app_id.in_(ids))  # (no NULLs: the key)
        return or_(t.c.app_id.in_(ids),
                   and_(t.c.app_name.in_(ids), t.c.app_name.not_in(taken)))

    @_reads("read the summaries from")
    def aggregates(self, *, app_ids: Sequence[str] | None = None
                   ) -> tuple[list[Row], list[Row]]:
        """Per app version: record count, mean latency and tokens; per app version, feedback
        and status: result count and mean score. Computed by the database."""
        t = self.tables
        rq = (select(t.records.c.app_id, t.records.c.app_name, t.records.c.app_version,
                     func.count().label("records"), func.avg(t.records.c.latency_s)
                     .label("latency"), func.avg(t.records.c.total_tokens)
                     .label("total_tokens"))
              .group_by(t.records.c.app_id, t.records.c.app_name, t.records.c.app_version))
        where = self._app_filter(app_ids)
        if where is not None:
            rq = rq.where(where)
        groups = (t.results.c.app_id, t.results.c.feedback_name, t.results.c.status)

        def summary(mean: Any) -> Any:
            return select(*groups, func.count().label("n"), mean.label("mean")).group_by(
                *groups)

        resq = summary(func.avg(t.results.c.score))
        with self._snapshot() as conn:
            apps = [dict(r._mapping) for r in conn.execute(rq)]
            for app in apps:  # (PostgreSQL's AVG of an integer column is a Decimal)
                for key in ("latency", "total_tokens"):
                    if isinstance(app[key], decimal.Decimal):
                        app[key] = float(app[key])
            wanted = {a["app_id"] for a in apps}
            only = None
            if where is not None:
                # (by the database, on its app_id index: grouping every app's results and
                # keeping these here cost one app's summary as much as the leaderboard's)
                if not wanted:
                    return apps, []
                only = t.results.c.app_id.in_(sorted(wanted))
                resq = resq.where(only)
            try:
                with (conn.begin_nested() if self._dialect == "postgresql"
                      else contextlib.nullcontext()):
                    rows = list(conn.execute(resq))
            except DBAPIError as exc:  # PostgreSQL: scores summed past the float limit
                if getattr(exc.orig, "sqlstate", None) != "22003":
                    raise
                exact = summary(func.avg(cast(t.results.c.score, Numeric)))
                rows = list(conn.execute(exact if only is None else exact.where(only)))
            results = [dict(r._mapping) for r in rows if r.app_id in wanted]
            for row in results:
                mean = row["mean"]
                if isinstance(mean, decimal.Decimal):
                    row["mean"] = float(mean)
                elif mean is not None and not math.isfinite(mean):
                    row["mean"] = self._mean_of(conn, row)  # (SQLite: inf)
        return apps, results

    def _mean_of(self, conn: Connection, group: Row) -> float:
        """The mean score of a group whose AVG overflowed: finite scores near the float
        limit (1e308 and 1.5e308) summed past it, and the leaderboard said inf."""
        t = self.tables.results
        scores = [r.score for r in conn.execute(
            select(t.c.score).where(t.c.app_id == group["app_id"],
                                    t.c.feedback_name == group["feedback_name"],
                                    t.c.status == group["status"],
                                    t.c.score.is_not(None)))]
        return math.fsum(v / len(scores) for v in scores) if scores else group["mean"]

    @_reads("read records from")
    def query_records(self, query: RecordQuery, *,
                      record_columns: Sequence[str] | None = None,
                      result_columns: Sequence[str] | None = None
                      ) -> tuple[list[Row], list[Row], int]:
        """A page of records matching `query` (newest first), their results, and the total
        number of matching records (oldest first, by created_at then result_id); with
        `record_columns` / `result_columns` only those columns (a list that shows no span
        trees reads none: megabytes each)."""
        t = self.tables
        cond = []
        where = self._app_filter(query.app_ids)
        if where is not None:
            cond.append(where)
        if query.app_versions is not None:
            cond.append(t.records.c.app_version.in_(self._texts(query.app_versions)))
        if query.record_status:
            cond.append(t.records.c.status == query.record_status)
        if query.search:
            cond.append(self._search_condition(query.search))
        if query.statuses is not None or (query.feedback_name and (
                query.min_score is not None or query.max_score is not None)):
            r = t.results
            sub = select(r.c.record_id)
            if query.feedback_name:  # (statuses alone: a result of any feedback)
                sub = sub.where(r.c.feedback_name == self._texts([query.feedback_name])[0])
            if query.statuses is not None:
                sub = sub.where(r.c.status.in_(list(query.statuses)))
            if query.min_score is not None:
                sub = sub.where(r.c.score >= query.min_score)
            if query.max_score is not None:
                sub = sub.where(r.c.score <= query.max_score)
            cond.append(t.records.c.record_id.in_(sub))
        base = select(*self._picked(t.records, record_columns))
        count = select(func.count()).select_from(t.records)
        for c in cond:
            base = base.where(c)
            count = count.where(c)
        page = (base.order_by(t.records.c.start_time.desc(), t.records.c.record_id)
                .limit(query.limit).offset(query.offset))
        with self._snapshot() as conn:
            records = _dicts(conn.execute(page))
            ids = [rec["record_id"] for rec in records]
            results = _dicts(conn.execute(
                select(*self._picked(t.results, result_columns))
                .where(t.results.c.record_id.in_(ids))
                .order_by(t.results.c.created_at, t.results.c.result_id))) if ids else []
            total = int(conn.execute(count).scalar() or 0)
        return records, results, total

    @_reads("read feedback definitions from")
    def definitions(self) -> list[Row]:
        with self._connect() as conn, conn.begin():
            return [dict(r._mapping) for r in conn.execute(select(self.tables.definitions))]

    def feedback_ids_of(self, names: Sequence[str], app_ids: Sequence[str]) -> list[Row]:
        t = self.tables.results
        out: list[Row] = []
        with self._snapshot() as conn:
            # (by app: each one a range of the (app_id, feedback_name, ...) index)
            for chunk in _chunks(sorted(set(app_ids)), 500):
                query = (select(t.c.app_id, t.c.feedback_name, t.c.feedback_id).distinct()
                         .where(t.c.app_id.in_(self._texts(chunk)),
                                t.c.feedback_name.in_(self._texts(sorted(set(names))))))
                out.extend(dict(r._mapping) for r in conn.execute(query))
        return out

    # ------------------------------------------------------------------ workers
    def claim(self, *, worker_id: str, token: str, limit: int, lease_seconds: float,
              now: datetime, exclude_feedback_ids: Sequence[str] = ()) -> list[Row]:
        t = self.tables.results
        claimable = (
            select(t.c.result_id)
            .where(t.c.status.in_(("pending", "running")))
            .where(or_(t.c.lease_expires_at.is_(None), t.c.lease_expires_at < now))
        )
        if exclude_feedback_ids:
            claimable = claimable.where(t.c.feedback_id.not_in(list(exclude_feedback_ids)))
        claimable = claimable.order_by(t.c.created_at).limit(limit)
        # Held, not started: `pending` until its evaluation gets a slot (then the worker
        # stores `running` with that time). A row a dead holder had started is pending again.
        values = {
            "status": "pending", "worker_id": worker_id, "lease_token": token,
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
            "attempts": t.c.attempts + 1, "started_at": None, "updated_at": now,
        }
        with self._connect() as raw:
            conn = raw.execution_options(**{_WRITE: True})
            with conn.begin():
                if self._dialect == "postgresql":
                    locked = claimable.with_for_update(skip_locked=True).scalar_subquery()
                    rows = conn.execute(
                        update(t).where(t.c.result_id.in_(locked)).values(**values)
                        .returning(*t.c)).all()
                    return [dict(r._mapping) for r in rows]
                # SQLite: BEGIN IMMEDIATE already made this the only writer
                ids = list(conn.execute(claimable).scalars())
                if not ids:
                    return []
                conn.execute(update(t).where(t.c.result_id.in_(ids)).values(**values))
                return [dict(r._mapping) for r in conn.execute(
                    select(t).where(t.c.result_id.in_(ids)))]

    def release(self, result_ids: Sequence[str], *, token: str) -> int:
        t = self.tables.results
        released = 0
        with self._connect() as raw:
            conn = raw.execution_options(**{_WRITE: True})
            with conn.begin():
                for chunk in _chunks(list(result_ids), 500):
                    released += conn.execute(
                        update(t)
                        .where(t.c.result_id.in_(chunk))
                        .where(t.c.status.in_(("pending", "running")))
                        .where(t.c.lease_token == token)
                        .values(status="pending", worker_id=None, lease_token=None,
                                lease_expires_at=None, started_at=None,
                                attempts=case((t.c.attempts > 0, t.c.attempts - 1),
                                              else_=0))).rowcount
        return released

    def _search_condition(self, search: str) -> Any:
        """Input or output containing `search`, case-insensitively.

        The texts are stored as JSON, where a quote, a newline or a backslash is escaped:
        the term is escaped the same way, or 'said "hi"' found nothing. SQLite's LIKE folds
        ASCII letters only: a term with other letters is matched on both sides folded by
        Python (slower: only those searches pay for it); PostgreSQL's ILIKE folds them all.
        """
        term = json_escaped(search)
        like = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        t = self.tables.records
        # LIKE finds the candidates; the regular expression then keeps those where the term
        # is not inside an escape ("nhere" in "line\\nhere": see search_regex)
        if self._dialect == "sqlite" and not search.isascii():
            pattern, rx = "%" + like.casefold() + "%", search_regex(search.casefold())
            return or_(*(and_(func.scrutiny_fold(c).like(pattern, escape="\\"),
                              func.scrutiny_fold(c).regexp_match(rx))
                         for c in (t.c.input_json, t.c.output_json)))
        pattern, rx = "%" + like + "%", search_regex(search)
        return or_(*(and_(c.ilike(pattern, escape="\\"), c.regexp_match(rx))
                     for c in (t.c.input_json, t.c.output_json)))

    @_reads("read results from")
    def results_by_ids(self, result_ids: Sequence[str]) -> list[Row]:
        t = self.tables.results
        out: list[Row] = []
        with self._connect() as conn, conn.begin():
            for chunk in _chunks(list(result_ids), 500):
                out.extend(dict(r._mapping) for r in conn.execute(
                    select(t).where(t.c.result_id.in_(chunk))))
        return out

    @_reads("read records from")
    def records_by_ids(self, record_ids: Sequence[str]) -> list[Row]:
        t = self.tables.records
        out: list[Row] = []
        with self._connect() as conn, conn.begin():
            for chunk in _chunks(list(record_ids), 500):
                out.extend(dict(r._mapping) for r in conn.execute(
                    select(t).where(t.c.record_id.in_(chunk))))
        return out

    @_reads("delete records from")
    def delete_records(self, *, before: datetime | None = None,
                       app_ids: Sequence[str] | None = None,
                       record_ids: Sequence[str] | None = None) -> int:
        if record_ids is not None:
            deleted = sum(self._delete_where(before, app_ids, chunk)
                          for chunk in _chunks(list(record_ids), 500))
        else:
            deleted = self._delete_where(before, app_ids, None)
        if deleted and self._dialect == "sqlite":
            self._checkpoint()
        return deleted

    def _delete_where(self, before: datetime | None, app_ids: Sequence[str] | None,
                      record_ids: list[str] | None) -> int:
        t = self.tables
        doomed = select(t.records.c.record_id)
        if before is not None:
            doomed = doomed.where(t.records.c.start_time < before)
        where = self._app_filter(app_ids)
        if where is not None:
            doomed = doomed.where(where)
        if record_ids is not None:
            doomed = doomed.where(t.records.c.record_id.in_(record_ids))
        with self._connect() as raw:
            conn = raw.execution_options(**{_WRITE: True})
            with conn.begin():
                conn.execute(delete(t.results).where(t.results.c.record_id.in_(doomed)))
                return conn.execute(delete(t.records).where(
                    t.records.c.record_id.in_(doomed))).rowcount or 0

    def _checkpoint(self) -> None:
        """(SQLite, after a delete.) Copy the write-ahead log into the file and empty it:
        the deleted rows' old pages stayed readable in the '-wal' file until the last
        connection closed. Best effort: a reader still using the log keeps it."""
        try:
            with self._connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except SQLAlchemyError:
            logger.debug("scrutiny: checkpoint after a delete failed", exc_info=True)

    def reopen_failed(self, *, feedback_names: Sequence[str] | None = None,
                      app_ids: Sequence[str] | None = None, now: datetime) -> int:
        """Make `failed` results pending again (of these feedback names and apps; None:
        all), as if never tried: no score, reason, attempts or lease. Returns how many."""
        t = self.tables
        where = t.results.c.status == "failed"
        if feedback_names is not None:
            where = and_(where, t.results.c.feedback_name.in_(list(feedback_names)))
        apps = self._app_filter(app_ids)
        if apps is not None:
            where = and_(where, t.results.c.record_id.in_(
                select(t.records.c.record_id).where(apps)))
        with self._connect() as raw:
            conn = raw.execution_options(**{_WRITE: True})
            with conn.begin():
                return conn.execute(update(t.results).where(where).values(
                    status="pending", score=None, explanation=None, error=None, attempts=0,
                    started_at=None, ended_at=None, updated_at=now, cost_json=None,
                    calls_json=None, worker_id=None, lease_token=None,
                    lease_expires_at=None)).rowcount or 0

    @_reads("count results in")
    def count_results(self) -> dict[str, int]:
        t = self.tables.results
        with self._connect() as conn, conn.begin():
            return {status: n for status, n in conn.execute(
                select(t.c.status, func.count()).group_by(t.c.status))}

    def close(self) -> None:
        self._closed.set()
        with self._gate:
            self.engine.dispose()
        self._finalizer.detach()  # (a connection still in use is closed on its return)

    def after_fork(self) -> None:
        """In a forked child: let go of the parent's connections; the next use makes one
        of the child's own. Once per process: this module's fork hook calls it for every
        store, the session's own reset again.

        PostgreSQL's are dropped, not closed: closing one here would end the parent's
        session on the server. SQLite's are closed (when the fork found them all idle,
        see _ForkGate): a copy left to the garbage collector kept the parent's lock
        bookkeeping in the child, where SQLite took it for locks the child held — the
        parent, closing its last connection, then found the database unused, checkpointed
        and deleted the write-ahead log the child was writing to, and the child's
        records stored since were lost, though stored as far as the child could tell.
        An in-memory database is kept: it is the child's own copy (a new connection opens
        an empty one, without Scrutiny's tables)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        if isinstance(self.engine.pool, StaticPool):
            return
        copied = list(self._connections)
        self._connections.clear()
        self.engine.dispose(close=False)
        if self._dialect == "sqlite" and _GATE.forked_clean():
            for dbapi_conn in copied:
                with contextlib.suppress(Exception):
                    dbapi_conn.close()
