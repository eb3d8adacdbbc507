"""Serving the dashboard: `session.run_dashboard()`, `scrutiny dashboard`, ports and tokens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import httpx
from click.testing import CliRunner

from scrutiny import ConfigurationError, Record, Session
from scrutiny.cli import main
from tests.test_dashboard_api import QUALITY, TOKEN, rag_record


@pytest.fixture
def stored(database_url: str) -> Iterator[Session]:
    s = Session(database_url)
    s.ingest(rag_record(1), [QUALITY])
    assert s.wait_for_feedback(10)
    yield s
    s.close()


@pytest.fixture
def taken_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


def test_run_dashboard_serves_in_the_background_and_stops(stored: Session) -> None:
    handle = stored.run_dashboard()
    try:
        assert handle.url.startswith("http://127.0.0.1:")
        assert handle.port > 0
        assert handle.running
        page = httpx.get(handle.url, timeout=10)
        assert page.status_code == 200
        assert "static/app.js" in page.text
        records = httpx.get(handle.url + "api/records", timeout=10).json()
        assert records["total"] == 1
    finally:
        assert handle.stop(timeout=10)
    assert not handle.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(handle.url + "api/info", timeout=2)
    handle.stop()  # idempotent


def test_a_stopped_dashboard_frees_its_port(stored: Session) -> None:
    with stored.run_dashboard() as first:
        port = first.port
    again = stored.run_dashboard(port=port)
    try:
        assert again.port == port
    finally:
        again.stop()


def test_a_taken_port_is_one_clear_error(stored: Session, taken_port: int) -> None:
    with pytest.raises(ConfigurationError, match=f"port {taken_port} on 127.0.0.1 is "
                                                 "already in use"):
        stored.run_dashboard(port=taken_port)


def test_binding_elsewhere_needs_a_token(stored: Session) -> None:
    with pytest.raises(ConfigurationError, match="without an access token"):
        stored.run_dashboard(host="0.0.0.0")
    with pytest.raises(ConfigurationError, match="at least 16 characters"):
        stored.run_dashboard(host="0.0.0.0", token="short")


def test_with_a_token_every_request_needs_it(stored: Session) -> None:
    handle = stored.run_dashboard(host="0.0.0.0", token=TOKEN)
    try:
        assert handle.url.endswith(f"?token={TOKEN}")
        base = f"http://127.0.0.1:{handle.port}/"
        assert httpx.get(base + "api/records", timeout=10).status_code == 401
        authorized = httpx.get(base + "api/records", timeout=10,
                               headers={"Authorization": f"Bearer {TOKEN}"})
        assert authorized.status_code == 200
        with httpx.Client(timeout=10, follow_redirects=True) as browser:
            page = browser.get(handle.url.replace(handle.host, "127.0.0.1"))
            assert page.status_code == 200
            assert "token" not in str(page.url)
            assert browser.get(base + "api/leaderboard").status_code == 200
    finally:
        handle.stop()


def test_without_the_extra_the_message_names_it_once(
        stored: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Starlette, run_dashboard() and `scrutiny dashboard` said "the dashboard
    needs the extra: pip install ... (the dashboard needs the extra: pip install ... (No
    module named 'starlette'))"."""
    for name in [m for m in sys.modules if m == "scrutiny.dashboard" or
                 m.startswith("scrutiny.dashboard.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "starlette", None)  # (import starlette fails)
    with pytest.raises(ConfigurationError) as raised:
        stored.run_dashboard()
    assert str(raised.value).count("pip install 'scrutiny[dashboard]'") == 1
    out = CliRunner().invoke(main, ["dashboard", "--database-url", stored.database_url])
    assert out.exit_code == 2
    assert out.stderr.count("pip install 'scrutiny[dashboard]'") == 1, out.stderr


def test_the_public_surface_is_pinned() -> None:
    import scrutiny.dashboard

    assert scrutiny.dashboard.__all__ == ["DashboardHandle", "create_app", "start_dashboard"]


def test_the_command_line_imports_the_dashboard_only_when_asked() -> None:
    code = ("import sys, scrutiny, scrutiny.cli\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- the command
def test_cli_dashboard_help() -> None:
    result = CliRunner().invoke(main, ["dashboard", "--help"])
    assert result.exit_code == 0
    for option in ("--database-url", "--host", "--port", "--token"):
        assert option in result.output


def _fails(args: list[str], env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("scrutiny: error: ")
    return lines[0]


def test_cli_taken_port(stored: Session, database_url: str, taken_port: int) -> None:
    line = _fails(["dashboard", "--port", str(taken_port)],
                  env={"SCRUTINY_DATABASE_URL": database_url})
    assert f"port {taken_port} on 127.0.0.1 is already in use" in line


def test_cli_refuses_other_hosts_without_a_token(stored: Session, database_url: str) -> None:
    line = _fails(["dashboard", "--host", "0.0.0.0", "--port", "0"],
                  env={"SCRUTINY_DATABASE_URL": database_url,
                       "SCRUTINY_DASHBOARD_TOKEN": ""})
    assert "without an access token" in line


def test_cli_refuses_a_password_on_its_command_line() -> None:
    line = _fails(["dashboard", "--database-url",
                   "postgresql+psycopg://me:hunter2-secret@db/scrutiny"])
    assert "$SCRUTINY_DATABASE_URL" in line
    assert "hunter2" not in line


def test_cli_does_not_create_a_missing_database(tmp_path: Path) -> None:
    line = _fails(["dashboard", "--database-url", f"sqlite:///{tmp_path}/none.sqlite"])
    assert "no database at" in line
    assert not (tmp_path / "none.sqlite").exists()


@pytest.mark.parametrize("command", ["records", "leaderboard"])
def test_cli_reads_create_neither_a_database_nor_tables(tmp_path: Path, command: str) -> None:
    """A mistyped path made a new empty database ('no records'); a mistyped prefix made
    Scrutiny's tables inside the user's own database."""
    line = _fails([command, "--database-url", f"sqlite:///{tmp_path}/typo.sqlite"])
    assert "there is no SQLite database at" in line
    assert not (tmp_path / "typo.sqlite").exists()
    with Session(f"sqlite:///{tmp_path}/app.sqlite") as s:
        s.ingest(Record(app_name="a", app_version="v", input="q", output="o",
                        start_time=0.0, end_time=0.0), [])
    line = _fails([command, "--database-url", f"sqlite:///{tmp_path}/app.sqlite",
                   "--table-prefix", "scrutny_"])
    assert "no Scrutiny tables with the prefix 'scrutny_'" in line
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{tmp_path}/app.sqlite")
    try:
        tables = sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()  # (Python 3.13 warns of a SQLite connection left open)
    assert not [t for t in tables if t.startswith("scrutny_")]


def test_migrate_refuse_creates_no_tables_in_a_database_without_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/own.sqlite"
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY)"))
        with pytest.raises(ConfigurationError, match="no Scrutiny tables with the prefix"):
            Session(url, migrate="refuse")
        assert sa.inspect(engine).get_table_names() == ["users"]
    finally:
        engine.dispose()


def test_cli_serves_until_interrupted(stored: Session, database_url: str) -> None:
    env = {**os.environ, "SCRUTINY_DATABASE_URL": database_url}
    proc = subprocess.Popen([sys.executable, "-m", "scrutiny.cli", "dashboard", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Scrutiny dashboard: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].strip()
        info = httpx.get(url + "api/info", timeout=10).json()
        assert info["database"] == database_url
        assert info["read_only"] is True
        assert httpx.get(url + "api/records", timeout=10).json()["total"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize(("args", "message"), [
    (["records", "--limit", "-1"], "Invalid value for '--limit'"),
    (["records", "--offset", "-5"], "Invalid value for '--offset'"),
    (["worker", "--log-every", "0"], "Invalid value for '--log-every'"),  # spun the CPU
    (["worker", "--poll-interval", "-1"], "Invalid value for '--poll-interval'"),
    (["worker", "--lease", "0.5"], "Invalid value for '--lease'"),
])
def test_cli_refuses_out_of_range_numbers(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_cli_worker_refuses_a_lease_that_is_not_a_number(tmp_path: Path) -> None:
    with Session(f"sqlite:///{tmp_path}/w.sqlite"):
        pass
    line = _fails(["worker", "--database-url", f"sqlite:///{tmp_path}/w.sqlite",
                   "--lease", "nan"])
    assert "lease_seconds must be a finite number of seconds" in line
