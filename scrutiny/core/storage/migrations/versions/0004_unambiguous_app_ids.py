"""Unambiguous app ids: rows whose app name or version holds ":" or "\\" get the ids
`scrutiny.core._records.app_id_for` gives them now.

Ids were ``f"{name}:{version}"``, so app "team" version "qa:v1" and app "team:qa" version
"v1" shared the id "team:qa:v1" (one apps row, the records and results of both under it).
Now each part has "\\" written as "\\\\" and ":" as "\\:" before the join, when it holds
either; every other id (no ":" or "\\" in name or version) stays as it was, so only rows
of such apps are touched. Records keep their name and version, so they are split by those;
an app that had lost its apps row to a collision gets one.

The new id is computed by the database (``replace`` and ``||``, on SQLite and PostgreSQL)
from the stored name and version — the same rule as `app_id_for`. Running it again changes
nothing. The downgrade leaves the ids as they are: the old ones collided.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from scrutiny.core.storage._schema import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _escaped(part: Any) -> Any:
    """`part` with "\\" written as "\\\\", then ":" as "\\:" (as `app_id_for` does)."""
    return sa.func.replace(sa.func.replace(part, "\\", "\\\\", type_=sa.String), ":", "\\:",
                           type_=sa.String)


def _special(part: Any) -> Any:
    """The text holds ":" or "\\" (no LIKE: PostgreSQL's LIKE escapes with "\\")."""
    return sa.or_(sa.func.replace(part, ":", "", type_=sa.String) != part,
                  sa.func.replace(part, "\\", "", type_=sa.String) != part)


def _new_id(table: Any) -> Any:
    return (_escaped(table.c.app_name) + sa.literal(":", sa.String)
            + _escaped(table.c.app_version))


def upgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    conn = op.get_bind()
    apps = sa.table(f"{prefix}apps", sa.column("app_id", sa.String),
                    sa.column("app_name", sa.String), sa.column("app_version", sa.String),
                    sa.column("metadata_json", sa.Text), sa.column("created_at", UTCDateTime))
    records = sa.table(f"{prefix}records", sa.column("record_id", sa.String),
                       sa.column("app_id", sa.String), sa.column("app_name", sa.String),
                       sa.column("app_version", sa.String),
                       sa.column("created_at", UTCDateTime))
    results = sa.table(f"{prefix}feedback_results", sa.column("record_id", sa.String),
                       sa.column("app_id", sa.String))
    special = sa.or_(_special(records.c.app_name), _special(records.c.app_version))
    special_apps = sa.or_(_special(apps.c.app_name), _special(apps.c.app_version))

    # Every (name, version) of such an app, with its new id and what its apps row holds:
    # taken from its own apps row where it has one, else from its first record.
    wanted: dict[str, dict[str, Any]] = {}
    for row in conn.execute(
            sa.select(_new_id(records).label("new_id"), records.c.app_name,
                      records.c.app_version, sa.func.min(records.c.created_at)
                      .label("created_at"))
            .where(special).group_by(records.c.app_name, records.c.app_version)):
        wanted[row.new_id] = {"app_name": row.app_name, "app_version": row.app_version,
                              "metadata_json": None, "created_at": row.created_at}
    rows = conn.execute(
        sa.select(_new_id(apps).label("new_id"), apps.c.app_id, apps.c.app_name,
                  apps.c.app_version, apps.c.metadata_json, apps.c.created_at)
        .where(special_apps)).all()
    # (an app's own row at its new id, when it has one already, says last)
    for row in sorted(rows, key=lambda r: bool(r.app_id == r.new_id)):
        wanted[row.new_id] = {"app_name": row.app_name, "app_version": row.app_version,
                              "metadata_json": row.metadata_json,
                              "created_at": row.created_at}

    # Each app gets the apps row of its new id. A new id may be the old id of another
    # such app (an old "a\\b:v" is the new id of "a\b"): that row is taken over, and the
    # app it belonged to gets its own new row in this same loop (new ids never collide).
    for new_id, values in wanted.items():
        changed = conn.execute(sa.update(apps).where(apps.c.app_id == new_id)
                               .values(**values)).rowcount
        if not changed:
            conn.execute(sa.insert(apps).values(app_id=new_id, **values))

    conn.execute(sa.update(records).where(special)
                 .where(records.c.app_id != _new_id(records))
                 .values(app_id=_new_id(records)))
    record_app_id = (sa.select(records.c.app_id)
                     .where(records.c.record_id == results.c.record_id)
                     .scalar_subquery())
    conn.execute(sa.update(results)
                 .where(results.c.record_id.in_(sa.select(records.c.record_id).where(special)))
                 .where(results.c.app_id != record_app_id)
                 .values(app_id=record_app_id))

    # Old rows no record refers to any more (a new id that was an old one was taken over).
    referenced = sa.select(records.c.app_id).where(records.c.app_id == apps.c.app_id)
    conn.execute(sa.delete(apps).where(special_apps)
                 .where(apps.c.app_id != _new_id(apps))
                 .where(~referenced.exists()))


def downgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    """The ids stay as they are: the old ones collided, and nothing needs them back."""
