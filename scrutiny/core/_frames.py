"""The pandas tables users read: records with feedback, and the leaderboard."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import pandas as pd

from scrutiny.core import _serialize
from scrutiny.core.storage import Row

__all__ = ["FRAME_REASON_COLUMNS", "FRAME_RECORD_COLUMNS", "FRAME_RESULT_COLUMNS", "NOT_APPLICABLE",
           "REASON_SUFFIX", "RESERVED_NAMES",
           "STATUS_SUFFIX", "RecordsFrame", "leaderboard_frame", "records_frame",
           "result_labels"]

STATUS_SUFFIX = " status"
NOT_APPLICABLE = "n/a"
"""The status of a feedback the record's app was never evaluated with (tables that mix
apps): said, not left a blank that reads like a lost result."""

_RECORD_COLUMNS = [
    "app_id", "app_name", "app_version", "record_id", "input", "output", "status", "error",
    "latency", "prompt_tokens", "completion_tokens", "total_tokens", "eval_total_tokens",
    "start_time", "end_time", "tags",
]
_LEADERBOARD_COLUMNS = ["records", "latency", "total_tokens", "pending", "running", "failed",
                        "skipped"]
FRAME_RECORD_COLUMNS = (
    "app_id", "app_name", "app_version", "record_id", "input_json", "output_json", "status",
    "error", "latency_s", "prompt_tokens", "completion_tokens", "total_tokens", "start_time",
    "end_time", "tags_json",
)
"""The stored record columns :func:`records_frame` reads: no span trees, contexts or
metadata (every column was read for the table, megabytes of spans per record)."""
FRAME_RESULT_COLUMNS = ("record_id", "feedback_name", "status", "score", "cost_json")
FRAME_REASON_COLUMNS = ("error", "explanation")
"""Read too when the table shows each result's reason (see RecordsFrame)."""
REASON_SUFFIX = " reason"
"""The stored result columns :func:`records_frame` reads (the store gives them oldest
first)."""
RESERVED_NAMES = frozenset(_RECORD_COLUMNS + _LEADERBOARD_COLUMNS)
"""Column names of the tables a feedback's name must not take (its score column would
replace or double them)."""


def result_labels(names: Sequence[str], taken: Collection[str] = ()) -> list[str]:
    """Per result of one record (oldest first, by their feedback `names`), the name it is
    shown under: its feedback's, and for a second result of one name ``"name (2)"``, then
    ``"name (3)"`` (skipping names in `taken` or given already).

    Releases before the second result of a name was refused stored one beside the first
    (a record scored again): the table and the dashboard's list showed whichever came last
    (a failed one over the done score the leaderboard counted)."""
    seen: dict[str, int] = {}
    out: list[str] = []
    for name in names:
        n = seen[name] = seen.get(name, 0) + 1
        label = name
        while n > 1 and (label == name or label in taken or label in out):
            label = f"{name} ({n})"
            n += 1
        out.append(label)
    return out


def records_frame(records: Sequence[Row], results: Sequence[Row], *,
                  reasons: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """A row per record; per feedback a score column and beside it a status column.

    Results are taken oldest first (as the store gives them, or by `created_at` where the
    rows have it); a record's second result of one feedback name (stored by older
    releases) gets columns of its own, ``"<name> (2)"`` (see :func:`result_labels`)."""
    builder = RecordsFrame(reasons=reasons)
    builder.add(records, results)
    return builder.build()


class RecordsFrame:
    """:func:`records_frame` made from pages of records (newest first) and their results,
    a column at a time: a dict per row of the table, then the frame, held it twice, and
    every stored row beside them."""

    def __init__(self, *, reasons: bool = False) -> None:
        self._data: dict[str, list[Any]] = {c: [] for c in _RECORD_COLUMNS}
        self._scores: dict[str, list[float]] = {}
        self._statuses: dict[str, list[str]] = {}
        # (with `reasons`: per feedback, beside its status, why it failed or was skipped,
        # or the judge's explanation — a table exported to CSV said only "failed")
        self._reasons: dict[str, list[str | None]] | None = {} if reasons else None
        self._rows = 0

    def add(self, records: Sequence[Row], results: Sequence[Row]) -> None:
        """The next page: records after those added so far, and their results."""
        if results and "created_at" in results[0]:
            results = sorted(results, key=lambda r: (r["created_at"],
                                                     r.get("result_id") or ""))
        names = {r["feedback_name"] for r in results} | set(self._scores)
        by_record: dict[str, list[Row]] = {}
        for r in results:
            by_record.setdefault(r["record_id"], []).append(r)
        labelled: list[tuple[str, str, Row]] = []  # (record id, column, result)
        for record_id, its in by_record.items():
            if len(its) > 1 and len({r["feedback_name"] for r in its}) < len(its):
                labels = result_labels([r["feedback_name"] for r in its], names)
                labelled += [(record_id, label, r)
                             for label, r in zip(labels, its, strict=True)]
            else:
                labelled += [(record_id, r["feedback_name"], r) for r in its]
        loads = _serialize.loads
        data = self._data
        data["app_id"] += [rec["app_id"] for rec in records]
        data["app_name"] += [rec["app_name"] for rec in records]
        data["app_version"] += [rec["app_version"] for rec in records]
        data["record_id"] += [rec["record_id"] for rec in records]
        data["input"] += [loads(rec.get("input_json")) for rec in records]
        data["output"] += [loads(rec.get("output_json")) for rec in records]
        data["status"] += [rec["status"] for rec in records]
        data["error"] += [rec.get("error") for rec in records]
        data["latency"] += [rec["latency_s"] for rec in records]
        data["prompt_tokens"] += [rec.get("prompt_tokens") for rec in records]
        data["completion_tokens"] += [rec.get("completion_tokens") for rec in records]
        data["total_tokens"] += [rec.get("total_tokens") for rec in records]
        data["start_time"] += [rec["start_time"] for rec in records]
        data["end_time"] += [rec["end_time"] for rec in records]
        data["tags"] += [loads(rec.get("tags_json")) or [] for rec in records]
        before, self._rows = self._rows, self._rows + len(records)
        for name in names | {label for _, label, _ in labelled}:
            if name not in self._scores:  # (a feedback first seen here: n/a above)
                self._scores[name] = [float("nan")] * before
                self._statuses[name] = [NOT_APPLICABLE] * before
                if self._reasons is not None:
                    self._reasons[name] = [None] * before
            self._scores[name] += [float("nan")] * len(records)
            self._statuses[name] += [NOT_APPLICABLE] * len(records)
            if self._reasons is not None:
                self._reasons[name] += [None] * len(records)
        position = {rec["record_id"]: before + i for i, rec in enumerate(records)}
        # What judging the record cost (its judges' tokens, kept apart from the app's):
        # it was on each result alone, and nothing summed it for a record or a version.
        evaluation = data["eval_total_tokens"]
        evaluation += [None] * len(records)
        for record_id, name, res in labelled:
            i = position.get(record_id)
            if i is None:
                continue
            spent = _total_tokens(res.get("cost_json"))
            if spent is not None:
                evaluation[i] = (evaluation[i] or 0) + spent
            self._scores[name][i] = res["score"] if res["score"] is not None else float("nan")
            self._statuses[name][i] = res["status"]
            if self._reasons is not None:
                self._reasons[name][i] = res.get("error") or res.get("explanation")

    def build(self) -> tuple[pd.DataFrame, list[str]]:
        """The table and its feedback columns."""
        feedback_columns = sorted(self._scores)
        data = self._data
        reasons = self._reasons
        for name in feedback_columns:
            data[name] = self._scores[name]
            data[name + STATUS_SUFFIX] = self._statuses[name]
            if reasons is not None:
                data[name + REASON_SUFFIX] = reasons[name]
        columns = list(_RECORD_COLUMNS)
        for name in feedback_columns:
            columns += [name, name + STATUS_SUFFIX]
            if reasons is not None:
                columns.append(name + REASON_SUFFIX)
        frame = (pd.DataFrame({c: data[c] for c in columns}, columns=columns) if self._rows
                 else pd.DataFrame(columns=columns))  # (object columns, as ever)
        self._data, self._scores, self._statuses = {}, {}, {}
        self._reasons = None if reasons is None else {}
        for name in feedback_columns:
            frame[name] = frame[name].astype("float64")
        for col in ("prompt_tokens", "completion_tokens", "total_tokens", "eval_total_tokens"):
            frame[col] = frame[col].astype("Int64")
        if not frame.empty:
            frame["start_time"] = pd.to_datetime(frame["start_time"], utc=True)
            frame["end_time"] = pd.to_datetime(frame["end_time"], utc=True)
        return frame, feedback_columns


def _total_tokens(cost_json: str | None) -> int | None:
    """The total tokens a stored evaluation cost says it used (None: none reported)."""
    if not cost_json:
        return None
    cost = _serialize.loads(cost_json)
    if not isinstance(cost, dict):
        return None
    total = cost.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool):
        return total
    parts = [cost.get(k) for k in ("prompt_tokens", "completion_tokens")]
    counted = [p for p in parts if isinstance(p, int) and not isinstance(p, bool)]
    return sum(counted) if counted else None


def _most(ways: list[bool | None]) -> bool:
    """The direction most of the app versions having a feedback give it (ties: higher)."""
    given = [w for w in ways if w is not None]
    return 2 * sum(given) >= len(given)


def leaderboard_frame(apps: Sequence[Row], results: Sequence[Row],
                      higher_is_better: dict[tuple[str, str], bool]) -> pd.DataFrame:
    """Mean score per app version per feedback (done results only), with counts.

    Takes the database's aggregates (:meth:`Store.aggregates`). Columns: one per feedback
    (the mean), then `records`, `latency` (mean seconds), `total_tokens` (mean, where
    reported), `pending`, `running`, `failed`, `skipped` (counts over all feedbacks). Rows are
    ranked best first by the mean of per-feedback ranks, each rank following that
    feedback's `higher_is_better` (given per app id and feedback name: apps sharing a
    database may each have a feedback of one name, wanting opposite things; a column
    whose apps disagree ranks each version by its own app's direction); a version with no
    done result of a feedback ranks below the worst score on it when some of its results
    failed (left out when there are simply none yet). Versions that tie keep the order
    of their names. `frame.attrs["higher_is_better"]` keeps the directions (a column
    whose apps disagree: the one most of its versions have).
    """
    index_cols = ["app_name", "app_version"]
    # (in name order, whatever order the database grouped them in: ties stay in it)
    in_order: list[Row] = sorted(apps, key=lambda a: (a["app_name"], a["app_version"]))
    base = pd.DataFrame(in_order, columns=["app_id", *index_cols, "records", "latency",
                                           "total_tokens"])
    if base.empty:  # the same columns as a filled one: code reading it does not break
        empty: pd.DataFrame = pd.DataFrame(
            columns=[*index_cols, *_LEADERBOARD_COLUMNS]).set_index(index_cols)
        empty.columns.name = None
        empty.attrs["higher_is_better"] = {}
        return empty
    res = pd.DataFrame(results, columns=["app_id", "feedback_name", "status", "n", "mean"])
    res = res.merge(base[["app_id", *index_cols]], on="app_id", how="inner")
    frame: pd.DataFrame = base.set_index(index_cols).drop(columns="app_id")
    frame["records"] = frame["records"].astype(int)
    feedback_names = sorted(set(res["feedback_name"]))
    # per feedback, the direction of each row's app (None: no result of it there)
    have = set(zip(res["app_id"], res["feedback_name"], strict=True))
    directions = {n: [higher_is_better.get((a, n), True) if (a, n) in have else None
                      for a in base["app_id"]] for n in feedback_names}
    done = res[res["status"] == "done"]
    # (made apart and joined once: a column inserted at a time made pandas warn, 27
    # PerformanceWarnings a call with 120 feedbacks, and slowed each insert)
    added: dict[str, pd.Series] = {}
    for name in feedback_names:
        means = done[done["feedback_name"] == name].set_index(index_cols)["mean"]
        added[name] = means.reindex(frame.index).astype("float64")
    for status in ("pending", "running", "failed", "skipped"):
        counts = res[res["status"] == status].groupby(index_cols)["n"].sum()
        added[status] = counts.reindex(frame.index, fill_value=0).astype(int)
    frame = pd.concat([frame, pd.DataFrame(added, index=frame.index)], axis=1)
    if feedback_names and len(frame) > 1:
        failed = res[res["status"] == "failed"]
        columns = []
        for n in feedback_names:
            ways = {w for w in directions[n] if w is not None}
            if len(ways) == 1:
                rank = frame[n].rank(ascending=not ways.pop())
            else:  # each version by its own app's direction: the better, the higher
                signs = [-1.0 if w is False else 1.0 for w in directions[n]]
                rank = (frame[n] * signs).rank(ascending=False)
            # A version whose results of this feedback all failed has no mean, but it is
            # not a version this feedback says nothing about: it ranks below the worst
            # score there (left out, a version failing its safety check on every record
            # ranked first).
            broke = failed[failed["feedback_name"] == n].groupby(index_cols)["n"].sum()
            broke = broke.reindex(frame.index, fill_value=0) > 0
            rank[broke & frame[n].isna()] = len(frame) + 1  # below the worst score
            columns.append(rank)
        ranks = pd.concat(columns, axis=1)
        # (ordered by a Series, not a temporary column: any name may be a feedback's)
        order = ranks.mean(axis=1).sort_values(na_position="last", kind="stable").index
        frame = frame.loc[order]
    frame = frame[[*feedback_names, "records", "latency", "total_tokens", "pending", "running",
                   "failed", "skipped"]]
    frame["total_tokens"] = frame["total_tokens"].astype("float64")
    frame.columns.name = None
    frame.attrs["higher_is_better"] = {n: _most(directions[n]) for n in feedback_names}
    return frame
