"""`TruSession`: a :class:`~scrutiny.Session` with TruLens's arguments and method names,
and TruLens's `run_dashboard` / `stop_dashboard` functions."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from scrutiny.compat._trulens_feedback import NoEquivalent
from scrutiny.core import ConfigurationError, FeedbackTimeout, Session
from scrutiny.core._frames import records_frame

__all__ = ["TruSession", "run_dashboard", "stop_dashboard"]

_current: list[TruSession] = []  # (the process's TruSession: see TruSession.__new__)
_UNSET = object()

_SESSION_HINTS = {
    "add_record": "session.ingest(scrutiny.Record(...), feedbacks), which stores the record "
                  "and evaluates the feedbacks on it",
    "add_record_nowait": "session.ingest(scrutiny.Record(...), feedbacks)",
    "run_feedback_functions": "session.ingest(record, feedbacks) evaluates feedbacks on a "
                              "record",
    "add_feedback": "a score Scrutiny did not compute has no place of its own: return it from "
                    "a feedback function (Feedback(fn)) given to the recorder",
    "add_feedbacks": "a Feedback given to the recorder (see add_feedback)",
    "add_app": "nothing: an app is known by its records (app_name, app_version)",
    "update_record": "nothing: a stored record is not changed; metadata belongs in the "
                     "recorder's metadata={...}",
    "get_records_by_conversation": "session.query_records(search=..., app_ids=...)",
    "add_ground_truth_to_dataset": "scrutiny.providers.GroundTruth({question: answer})",
    "get_ground_truth": "scrutiny.providers.GroundTruth({question: answer})",
    "connector": "the session itself (session.database_url, session.store)",
}


class TruSession(Session):
    """A :class:`~scrutiny.Session` with TruLens's arguments and method names.

    ``TruSession(database_url=None, database_prefix=None)``; Scrutiny's own options
    (``feedback_mode=``, ``max_concurrency=``, ...) are accepted by keyword. The default
    database is Scrutiny's (``$SCRUTINY_DATABASE_URL``, else ``sqlite:///scrutiny.sqlite``),
    not TruLens's ``default.sqlite``.

    Raises:
        ConfigurationError: a TruLens option with no equivalent (``connector=``,
            ``database_engine=``, ``database_args=``, ``database_redact_keys=True``).
    """

    def __new__(cls, database_url: str | None = None, **options: Any) -> TruSession:
        # TruLens's TruSession is one per process: `TruSession()` later in a script (to
        # read the leaderboard) is the same session. Here it made a second one, on the
        # default database, and every recorder made without session= stored its records
        # there from then on, silently.
        current = _current[0] if _current else None
        if current is not None and not current.closed and type(current) is cls and (
                not options and database_url in (None, current._tru_url)):
            return current
        return super().__new__(cls)

    def __init__(self, database_url: str | None = None, *,
                 database_prefix: str | None = None, database_redact_keys: bool = False,
                 database_check_revision: bool = True, database_args: Any = None,
                 database_engine: Any = None, connector: Any = None, **options: Any) -> None:
        if self.__dict__.get("_tru_url", _UNSET) is not _UNSET:
            return  # (the process's TruSession, given again by TruSession(): see __new__)
        if connector is not None or database_engine is not None:
            raise ConfigurationError(
                "connector= / database_engine=: Scrutiny opens the database itself (WAL and a "
                "busy timeout on SQLite, pre-ping on PostgreSQL); give database_url=...")
        if database_args:
            raise ConfigurationError(
                "database_args=: Scrutiny makes the engine itself; give the driver's options "
                "in the URL's query (e.g. ?sslmode=require)")
        if database_redact_keys:
            raise ConfigurationError(
                "database_redact_keys=True: Scrutiny has no key redaction, and stores no app "
                "definition (where TruLens redacts keys); records hold the calls' inputs and "
                "outputs as the framework reports them")
        if database_prefix is not None:
            if "table_prefix" in options:
                raise ConfigurationError("give the prefix once: database_prefix= or "
                                         "table_prefix=")
            options["table_prefix"] = database_prefix
        del database_check_revision  # (Scrutiny brings the schema up to date when opening)
        super().__init__(database_url, **options)
        self._tru_evaluator: Any = None
        self._tru_dashboard: Any = None
        self._tru_url = database_url
        _current[:] = [self]

    def __getattr__(self, name: str) -> Any:
        hint = _SESSION_HINTS.get(name)
        if hint is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise NoEquivalent(f"session.{name} (TruLens) has no equivalent; use {hint}")

    # ------------------------------------------------------------------ database
    def reset_database(self) -> int:
        """Delete every stored record and result (TruLens's semantics); returns the count."""
        return self.delete_records(before=datetime.max.replace(tzinfo=timezone.utc))

    def migrate_database(self, **kwargs: Any) -> None:
        """Nothing to do: the session brought the schema up to date when it was opened
        (``migrate="upgrade"``; ``scrutiny db upgrade`` does it from the command line)."""

    def force_flush(self, timeout_millis: int = 300_000) -> bool:
        """Store everything queued so far; False when `timeout_millis` ran out first."""
        return self.flush(timeout_millis / 1000)

    def delete_app(self, app_id: str) -> int:
        """Delete the records (and results) of an app; returns how many."""
        return self.delete_records(app_ids=[app_id])

    def get_app(self, app_id: str) -> dict[str, Any] | None:
        """An app version with records (as :meth:`get_apps` lists it), or None."""
        return next((a for a in self.get_apps() if a["app_id"] == app_id), None)

    # ------------------------------------------------------------------ reading
    def _tru_app_ids(self, app_ids: Sequence[str] | None, app_name: str | None,
                     app_version: str | None, app_versions: Sequence[str] | None
                     ) -> Sequence[str] | None:
        """The app filter: `app_ids` as given (None or empty: every app), or the ids of the
        apps with that name and version(s) among them (empty: no app matches)."""
        if app_name is None and app_version is None and not app_versions:
            return app_ids or None
        versions = {*(app_versions or ()), *(() if app_version is None else (app_version,))}
        return [a["app_id"] for a in self.get_apps()
                if (app_name is None or a["app_name"] == app_name)
                and (not versions or a["app_version"] in versions)
                and (not app_ids or a["app_id"] in app_ids or a["app_name"] in app_ids)]

    def get_records_and_feedback(
        self,
        app_ids: Sequence[str] | None = None,
        app_name: str | None = None,
        app_version: str | None = None,
        app_versions: Sequence[str] | None = None,
        run_name: str | None = None,
        record_ids: Sequence[str] | None = None,
        offset: int | None = None,
        limit: int | None = None,
        *,
        wait: bool = False,
        timeout: float | None = None,
        reasons: bool = False,
    ) -> tuple[pd.DataFrame, list[str]]:
        """Records with their feedback, newest first, filtered as in TruLens (by app ids,
        app name and version(s), record ids) and paged (`offset`, `limit`).

        The columns are Scrutiny's (see :meth:`Session.get_records_and_feedback`): a score
        column and a ``"<name> status"`` column per feedback; ``start_time`` where TruLens
        has ``ts``; no cost in money.

        Raises:
            ConfigurationError: `run_name` (Scrutiny has no runs).
        """
        if run_name is not None:
            raise NoEquivalent("run_name=: Scrutiny has no runs; filter by app (app_name=, "
                               "app_version=) or give the recorder metadata={...}")
        ids = self._tru_app_ids(app_ids, app_name, app_version, app_versions)
        if record_ids is not None:
            return self._tru_records(record_ids, ids, wait=wait, timeout=timeout,
                                     offset=offset or 0, limit=limit, reasons=reasons)
        if ids is not None and not ids:
            return records_frame([], [], reasons=reasons)  # (no app has that name, version)
        return super().get_records_and_feedback(ids, wait=wait, timeout=timeout, limit=limit,
                                                offset=offset or 0, reasons=reasons)

    def _tru_records(self, record_ids: Sequence[str], app_ids: Sequence[str] | None, *,
                     wait: bool, timeout: float | None, offset: int, limit: int | None,
                     reasons: bool = False) -> tuple[pd.DataFrame, list[str]]:
        if isinstance(record_ids, str):
            record_ids = [record_ids]
        timeout = self.flush_timeout if timeout is None else timeout
        if wait:
            self.wait_for_feedback(timeout)
        else:
            self.flush(timeout)
        rows, results = [], []
        for record_id in dict.fromkeys(record_ids):
            row, its_results = self.store.record(record_id)
            if row is None or (app_ids is not None and row["app_id"] not in app_ids
                               and row["app_name"] not in app_ids):
                continue
            rows.append(row)
            results.extend(its_results)
        rows.sort(key=lambda r: r["start_time"], reverse=True)
        rows = rows[offset:] if limit is None else rows[offset:offset + limit]
        kept = {r["record_id"] for r in rows}
        return records_frame(rows, [r for r in results if r["record_id"] in kept],
                             reasons=reasons)

    def get_leaderboard(
        self,
        app_ids: Sequence[str] | None = None,
        group_by_metadata_key: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        format: str = "dataframe",
        *,
        timeout: float | None = None,
    ) -> Any:
        """Mean score per app version per feedback, best first; `format` ``"dataframe"``,
        ``"dict"`` or ``"json"`` (rows with their ``app_name`` and ``app_version``).

        Raises:
            ConfigurationError: `group_by_metadata_key`, `limit` or `offset`, or another
                format.
        """
        if group_by_metadata_key is not None:
            raise NoEquivalent(
                "get_leaderboard(group_by_metadata_key=...): group the records instead: "
                "df, names = session.get_records_and_feedback(); pd.concat([df, "
                "pd.json_normalize(...)]) or record one app version per key value")
        if limit is not None or offset:
            raise NoEquivalent(
                "get_leaderboard(limit=, offset=): the leaderboard is computed over every "
                "record; for a page of records use get_records_and_feedback(limit=, offset=)")
        if format not in ("dataframe", "dict", "json"):
            raise ConfigurationError(f"format must be 'dataframe', 'dict' or 'json', got "
                                     f"{format!r}")
        board = super().get_leaderboard(app_ids or None, timeout=timeout)  # ([]: TruLens's all)
        if format == "dataframe":
            return board
        rows = board.reset_index()
        return rows.to_dict(orient="records") if format == "dict" else rows.to_json(
            orient="records", double_precision=15)

    # ------------------------------------------------------------------ waiting
    def wait_for_feedback_results(self, record_ids: Sequence[str] | None = None,
                                  feedback_names: Sequence[str] | None = None,
                                  timeout: float | None = 60.0, poll_interval: float = 0.5,
                                  *, feedback_timeout: float | None = None) -> bool:
        """Wait until the results of `feedback_names` (default: all) on the records
        `record_ids` are stored — also those evaluated by workers elsewhere — or, without
        record ids, every result this session accepted so far. Returns True.

        Raises:
            FeedbackTimeout: `timeout` seconds passed first; the message lists what is
                still missing (it will still be stored).
            ConfigurationError: a record has no result of a feedback named (it never will).
        """
        if feedback_timeout is not None:  # (the name this method used to have)
            timeout = feedback_timeout
        if record_ids is not None and (isinstance(record_ids, str | bytes)
                                       or not isinstance(record_ids, Sequence)):
            raise ConfigurationError(
                f"record_ids is a list of record ids, got {record_ids!r}; to wait for "
                "everything with a time limit, wait_for_feedback_results(timeout=seconds)")
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if record_ids is None:
            if feedback_names is not None:
                raise ConfigurationError("feedback_names= needs the record_ids= to wait for")
            if not self.wait_for_feedback(timeout):
                raise FeedbackTimeout(
                    f"feedback results still unfinished after {timeout}s (they stay pending "
                    f"or running and will be stored): {self.stats()}", timeout=timeout or 0.0)
            return True
        missing: list[str] = []
        for record_id in record_ids:
            record = self.get_record(record_id)
            while record is None and (deadline is None or time.monotonic() < deadline):
                time.sleep(min(poll_interval, left() or poll_interval))  # (another process)
                record = self.get_record(record_id)
            if record is None:
                missing.append(f"record {record_id}, which is not in the database")
                continue
            results = {fb.name: r for fb, r in
                       record.wait_for_feedback_results(left()).items()}
            for name in feedback_names or sorted(results):
                if name not in results:
                    raise ConfigurationError(
                        f"record {record_id} has no result of feedback {name!r} and never "
                        f"will; its feedbacks: {sorted(results)}")
                if not results[name].status.is_final:
                    missing.append(f"{name!r} of record {record_id} "
                                   f"({results[name].status.value})")
        if missing:
            raise FeedbackTimeout(f"after {timeout}s still waiting for {', '.join(missing)} "
                                  "(a result still pending or running is stored when it "
                                  "ends)", timeout=timeout or 0.0)
        return True

    # ------------------------------------------------------------------ workers
    def start_evaluator(self, restart: bool = False, fork: bool = False,
                        disable_tqdm: bool = False, run_location: Any = None,
                        return_when_done: bool = False) -> Any:
        """Evaluate pending (deferred) feedback in this process, in the background; with
        `return_when_done`, evaluate what is pending now and return when it is stored.

        Returns:
            The worker (``.stop()``), or None with `return_when_done`.
        """
        if fork:
            raise ConfigurationError("start_evaluator(fork=True): run `scrutiny worker` "
                                     "processes instead, as many as you like")
        if run_location is not None:
            raise ConfigurationError("run_location=: feedback runs where a worker runs "
                                     "(`scrutiny worker`, session.start_worker())")
        if return_when_done:
            self.resume_pending()
            return None
        running = self._tru_evaluator
        if running is not None and running.running:
            if not restart:
                raise RuntimeError("Evaluator is already running in this process "
                                   "(restart=True replaces it).")
            self.stop_evaluator()
        self._tru_evaluator = self.start_worker()
        return self._tru_evaluator

    run_evaluator = start_evaluator

    def stop_evaluator(self) -> None:
        """Stop the worker :meth:`start_evaluator` started (its claimed work is finished,
        within the session's `flush_timeout`, or released)."""
        running, self._tru_evaluator = self._tru_evaluator, None
        if running is None:
            raise RuntimeError("Evaluator not running in this process.")
        running.stop(self.flush_timeout)

    # ------------------------------------------------------------------ dashboard
    def run_dashboard(self, port: int | None = None, address: str | None = None,
                      force: bool = False, *, host: str | None = None,
                      token: str | None = None, sis_compatibility_mode: bool = False,
                      _dev: Any = None, _watch_changes: bool = False) -> Any:
        """Serve the dashboard of this session's database in the background (on a free
        port unless `port` is given); a second call returns the running one unless
        `force`. Returns a handle with ``.url`` and ``.stop()``."""
        running = self._tru_dashboard
        if running is not None and running.running:
            if not force:
                return running
            running.stop()
        self._tru_dashboard = super().run_dashboard(
            host=address or host or "127.0.0.1", port=port or 0, token=token)
        return self._tru_dashboard

    start_dashboard = run_dashboard

    def stop_dashboard(self, force: bool = False) -> None:
        """Stop the dashboard :meth:`run_dashboard` started."""
        running, self._tru_dashboard = self._tru_dashboard, None
        if running is None:
            if not force:
                raise RuntimeError("Dashboard not running in this process.")
            return
        running.stop()


def _session_for(session: Session | None) -> Session:
    return session if session is not None else Session.current()


def run_dashboard(session: Session | None = None, port: int | None = None,
                  address: str | None = None, force: bool = False, **options: Any) -> Any:
    """TruLens's ``run_dashboard(session)``: serve the dashboard of `session` (default: the
    session created last) in the background; returns a handle with ``.url``."""
    session = _session_for(session)
    if isinstance(session, TruSession):
        return session.run_dashboard(port, address, force, **options)
    return session.run_dashboard(host=address or "127.0.0.1", port=port or 0,
                                 token=options.get("token"))


def stop_dashboard(session: Session | None = None, force: bool = False) -> None:
    """TruLens's ``stop_dashboard(session)``."""
    session = _session_for(session)
    if not isinstance(session, TruSession):
        raise ConfigurationError("stop_dashboard(): stop the handle run_dashboard() returned "
                                 "(handle.stop())")
    session.stop_dashboard(force)
