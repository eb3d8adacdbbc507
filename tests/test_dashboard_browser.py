"""The dashboard page in headless Chromium (Debian's `chromium`, driven by Playwright).

Skipped when Playwright or Chromium is missing, unless ``SCRUTINY_REQUIRE_BROWSER=1`` (set
by CI), which makes that a failure. ``SCRUTINY_DOCS_SCREENSHOTS=1`` also writes the record
view's screenshot to ``docs/record-view.png`` (and the overview to ``docs/dashboard.png``).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from scrutiny import Feedback, Session
from tests.test_dashboard_api import SCRIPT, TOKEN, fill, rag_record

CHROMIUM = os.environ.get("SCRUTINY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
DOCS = Path(__file__).resolve().parent.parent / "docs"
WAIT_MS = 15_000


class Seen:
    """What a page did that a test must see: dialogs opened, JavaScript errors."""

    def __init__(self) -> None:
        self.dialogs: list[str] = []
        self.errors: list[str] = []


SEEN: dict[int, Seen] = {}


def _missing(reason: str) -> None:
    if os.environ.get("SCRUTINY_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SCRUTINY_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright is not installed (pip install playwright)")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        _missing(f"Chromium is not at {CHROMIUM} (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    seen = Seen()
    pg.on("dialog", lambda d: (seen.dialogs.append(d.message), d.dismiss()))
    pg.on("pageerror", lambda e: seen.errors.append(str(e)))
    SEEN[id(pg)] = seen
    yield pg
    context.close()
    del SEEN[id(pg)]
    assert seen.errors == [], "the page raised JavaScript errors"


class Dashboard:
    """A session on the test's database and, once started, its dashboard. The fixture
    ends both, after setting the events given to `release` (gates a feedback waits on:
    closing the session would otherwise wait for it)."""

    def __init__(self, database_url: str) -> None:
        self.session = Session(database_url)
        self._handle: Any = None
        self._gates: list[threading.Event] = []

    def start(self, **options: Any) -> str:
        """Serve the dashboard; returns its address."""
        self._handle = self.session.run_dashboard(**options)
        return str(self._handle.url)

    def release(self, *gates: threading.Event) -> None:
        self._gates.extend(gates)

    def end(self) -> None:
        for gate in self._gates:
            gate.set()
        if self._handle is not None:
            self._handle.stop()
        self.session.close()


@pytest.fixture
def dashboard(database_url: str) -> Iterator[Dashboard]:
    served = Dashboard(database_url)
    try:
        yield served
    finally:
        served.end()


@pytest.fixture
def served(dashboard: Dashboard) -> tuple[Session, str, list[Any]]:
    """The dashboard over `fill`'s records."""
    records = fill(dashboard.session)
    return dashboard.session, dashboard.start(), records


def _screenshot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("SCRUTINY_DOCS_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / name)


def test_leaderboard_and_a_records_span_tree(page: Any, served: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    _session, url, records = served
    page.goto(url)
    board = page.locator("#leaderboard table")
    expect(board.locator("tbody tr")).to_have_count(3)
    expect(board.locator("thead")).to_contain_text("quality ↑")
    expect(board.locator("thead")).to_contain_text("verbosity ↓")
    v2 = board.locator("tr[data-app='qa:v2']")
    expect(v2.locator("td[data-feedback='quality'] .mean")).to_have_text("0.900")
    expect(v2.locator("td[data-feedback='broken']")).to_contain_text("1 failed")
    expect(page.locator("#records tbody tr")).to_have_count(8)
    expect(page.locator("#chart-scores .dist-row")).to_have_count(3)
    expect(page.locator("#chart-latency circle")).to_have_count(8)
    _screenshot(page, tmp_path, "dashboard.png")

    target = records[5]
    page.locator(f"#records tr[data-record-id='{target.record_id}'] a").click()
    spans = page.locator(".waterfall .wf-row[data-span-id]")
    expect(spans).to_have_count(5)
    expect(spans.nth(0)).to_contain_text("RunnableSequence")
    expect(spans.nth(3)).to_contain_text("ChatOpenAI")
    expect(spans.nth(3).locator(".wf-dur")).to_have_text("910 ms")
    assert [spans.nth(i).get_attribute("data-depth") for i in range(5)] == [
        "0", "1", "1", "1", "1"]
    expect(page.locator("#record-input")).to_have_text(target.input)
    expect(page.locator("ol.contexts li")).to_have_count(2)
    expect(page.locator(".card[data-feedback='quality'] .big")).to_have_text("0.900")
    expect(page.locator(".card[data-feedback='quality']")).to_contain_text(
        "The answer names a city from the context.")
    expect(page.locator(".card[data-feedback='broken']")).to_contain_text("judge unavailable")
    spans.nth(3).click()
    expect(page.locator(".wf-detail:visible")).to_contain_text("gpt-4o-mini")
    _screenshot(page, tmp_path, "record-view.png")


def test_pending_feedback_becomes_its_score_without_a_reload(page: Any,
                                                             dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    gate = threading.Event()

    def gated(output: str) -> tuple[float, str]:
        gate.wait(30)
        return 0.75, "released by the test"

    session = dashboard.session
    dashboard.release(gate)
    record = session.ingest(rag_record(1), [Feedback(gated, name="gated").on_output()])
    assert session.flush(10)
    url = dashboard.start()
    page.goto(url + f"#/record/{record.record_id}")
    card = page.locator(".card[data-feedback='gated']")
    expect(card).to_have_attribute("data-status", re.compile("pending|running"))
    expect(card.locator(".big")).to_have_text("—")
    expect(page.locator("#live")).to_have_text("live")
    page.evaluate("window.__still_the_same_page = true")
    gate.set()
    expect(card.locator(".big")).to_have_text("0.750")
    expect(card).to_have_attribute("data-status", "done")
    expect(card).to_contain_text("released by the test")
    expect(page.locator("#live")).to_have_text("idle")
    assert page.evaluate("window.__still_the_same_page") is True

    page.goto(url)  # the records table shows the stored score too
    cell = page.locator(f"tr[data-record-id='{record.record_id}'] td[data-feedback='gated']")
    expect(cell).to_have_text("0.750")


def test_the_score_chart_follows_scores_that_arrive_while_it_is_open(
        page: Any, dashboard: Dashboard) -> None:
    """Scores stored within 5 s of the charts' last load showed in the leaderboard at once,
    while the distribution chart said "No scores yet." until its 60 s timer."""
    from playwright.sync_api import expect

    gate = threading.Event()

    def later(output: str) -> float:
        gate.wait(30)
        return 0.5

    session = dashboard.session
    dashboard.release(gate)
    session.ingest(rag_record(1), [Feedback(later, name="later").on_output()])
    assert session.flush(10)
    page.goto(dashboard.start())
    expect(page.locator("#chart-scores")).to_contain_text("No scores yet")
    gate.set()
    expect(page.locator('#leaderboard td[data-feedback="later"] .mean')).to_have_text("0.500")
    expect(page.locator("#chart-scores")).not_to_contain_text("No scores yet")


def test_a_result_left_pending_says_for_how_long_and_what_evaluates_it(
        page: Any, database_url: str) -> None:
    """A pending card said only "pending | —": a result stuck for days looked like one
    queued a second ago, and nothing said a worker was needed."""
    import datetime as dt

    import sqlalchemy as sa
    from playwright.sync_api import expect

    from tests.support.deferred_feedbacks import length

    with Session(database_url, feedback_mode="deferred") as app:
        record = app.ingest(rag_record(1), [Feedback(length).on_output()])
        assert app.flush(10)
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:  # (stored three hours ago)
        conn.execute(sa.text("UPDATE scrutiny_feedback_results SET created_at = :t"),
                     {"t": dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=3)})
    engine.dispose()
    viewer = Dashboard(database_url)
    try:
        page.goto(viewer.start() + f"#/record/{record.record_id}")
        card = page.locator(".card[data-feedback='length']")
        expect(card).to_contain_text("pending for 3 h")
        expect(card.locator(".waiting")).to_contain_text("scrutiny worker")
    finally:
        viewer.end()


def test_span_names_thirty_levels_deep_stay_readable(page: Any,
                                                     dashboard: Dashboard) -> None:
    """At 16 px a level, spans 20 levels down (a LangGraph agent's) were indented past
    the name column: their names were cut to nothing."""
    from playwright.sync_api import expect

    from scrutiny import Record, Span

    spans = [Span(f"s{i}", None if i == 0 else f"s{i - 1}", f"Node{i}", "chain",
                  1_700_000_000 + i * 0.01, 1_700_000_001 - i * 0.01) for i in range(30)]
    record = dashboard.session.ingest(Record(app_name="deep", app_version="v1", input="q",
                                             output="a", spans=spans,
                                             start_time=1_700_000_000, end_time=1_700_000_001),
                                      [])
    assert dashboard.session.flush(10)
    page.goto(dashboard.start() + f"#/record/{record.record_id}")
    deepest = page.locator(".wf-row[data-depth='29'] .span-name")
    expect(deepest).to_have_text("Node29")
    name_box, row_box = deepest.bounding_box(), page.locator(
        ".wf-row[data-depth='29'] .wf-name").bounding_box()
    assert name_box is not None
    assert row_box is not None
    visible = row_box["x"] + row_box["width"] - name_box["x"]
    assert visible >= 50, visible  # (room for "Node29" in the name column)


def test_a_script_in_an_output_is_shown_as_text(page: Any, served: Any) -> None:
    from playwright.sync_api import expect

    _session, url, records = served
    evil = next(r for r in records if r.output == SCRIPT)
    page.goto(url)
    row = page.locator(f"#records tr[data-record-id='{evil.record_id}']")
    expect(row.locator("td.output")).to_have_text(SCRIPT)
    expect(row.locator("td.output")).to_be_visible()
    row.locator("a").click()
    expect(page.locator("#record-output")).to_have_text(SCRIPT)
    expect(page.locator("#record-output")).to_be_visible()
    expect(page.locator(".wf-row[data-span-id]")).to_have_count(5)
    assert page.locator("main script").count() == 0
    assert SEEN[id(page)].dialogs == []


def test_the_token_in_the_url_becomes_a_cookie(page: Any, dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    session = dashboard.session
    session.ingest(rag_record(3), [])
    assert session.flush(10)
    url = dashboard.start(token=TOKEN)
    page.goto(url)
    expect(page.locator("#records tbody tr")).to_have_count(1)
    assert "token" not in page.url
    page.reload()
    expect(page.locator("#records tbody tr")).to_have_count(1)
    anonymous = page.context.browser.new_page()
    try:
        anonymous.goto(url.split("?")[0])
        expect(anonymous.locator("body")).to_contain_text("needs its access token")
    finally:
        anonymous.close()


@pytest.mark.parametrize("address", ["%E0%A4%A", "no-such-record"])
def test_a_bad_or_unknown_record_address_says_so(page: Any, served: Any,
                                                 address: str) -> None:
    from playwright.sync_api import expect

    _session, url, _records = served
    page.goto(url + f"#/record/{address}")
    missing = page.locator("#record-view #record-missing")
    expect(missing).to_contain_text("No such record")
    expect(missing).to_contain_text(address)
    expect(page.locator("#error")).to_be_hidden()
    assert SEEN[id(page)].errors == []
    page.get_by_role("link", name="← All records").click()
    expect(page.locator("#records tbody tr")).to_have_count(8)


def test_an_offset_past_the_end_offers_the_first_page(page: Any, served: Any) -> None:
    from playwright.sync_api import expect

    _session, url, _records = served
    page.goto(url + "#/?offset=5000")
    expect(page.locator("#records-count")).to_have_text("8 matching")
    expect(page.locator("#records #past-end")).to_contain_text("last of the 8 matching records")
    pager = page.locator("#pager")
    expect(pager.locator("span")).to_have_text("past the last of 8")
    expect(pager).not_to_contain_text("5,001")
    expect(pager.get_by_role("button", name="Older →")).to_be_disabled()
    page.locator("#past-end").get_by_role("link", name="← First page").click()
    expect(page.locator("#records tbody tr")).to_have_count(8)
    expect(pager.locator("span")).to_have_text("1\u20138 of 8")
    expect(page).not_to_have_url(re.compile("offset"))

    page.goto(url + "#/?offset=5000")
    expect(pager.locator("span")).to_have_text("past the last of 8")
    pager.get_by_role("button", name="← Newer").click()  # to the last page with records
    expect(page.locator("#records tbody tr")).to_have_count(8)
    expect(pager.locator("span")).to_have_text("1\u20138 of 8")


def test_the_leaderboard_shows_a_running_result_as_running(page: Any,
                                                           dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    gate, started = threading.Event(), threading.Event()

    def gated(output: str) -> float:
        started.set()
        gate.wait(30)
        return 0.5

    session = dashboard.session
    dashboard.release(gate)
    record = session.ingest(rag_record(1), [Feedback(gated, name="gated").on_output()])
    assert started.wait(10)
    url = dashboard.start()
    page.goto(url)
    row = page.locator("#leaderboard tr[data-app='qa:v1']")
    expect(row.locator("td[data-feedback='gated'] .badge")).to_have_text(["1 running"])
    expect(row.locator("td[data-count='running']")).to_have_text("1")
    expect(row.locator("td[data-count='pending']")).to_have_text("0")
    expect(page.locator("#leaderboard thead")).to_contain_text("Running")
    cell = page.locator(f"tr[data-record-id='{record.record_id}'] td[data-feedback='gated']")
    expect(cell).to_have_attribute("data-status", "running")
    gate.set()
    expect(row.locator("td[data-feedback='gated'] .mean")).to_have_text("0.500")
    expect(row.locator("td[data-feedback='gated'] .badge")).to_have_count(0)
    expect(row.locator("td[data-count='running']")).to_have_text("0")


def test_choosing_an_app_whose_name_holds_a_colon_shows_only_that_app(
        page: Any, dashboard: Dashboard) -> None:
    """The page filtered by "name:version" (an id it built itself) and by bare names: app
    "team:qa" showed app "team" version "qa" too, and the three apps below mixed."""
    from playwright.sync_api import expect

    session = dashboard.session
    fb = Feedback(lambda output: 1.0, name="one").on_output()
    for i, (app, version) in enumerate([("team", "qa"), ("team:qa", "v1"),
                                        ("team", "qa:v1")]):
        session.ingest(rag_record(i, app=app, version=version), [fb])
    assert session.wait_for_feedback(30)
    url = dashboard.start()
    rows = page.locator("#records tbody tr")
    page.goto(url + "#/?app=team%3Aqa")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("country 1?")
    expect(page.locator("#leaderboard tbody tr")).to_have_count(1)
    page.goto(url + "#/?app=team&version=qa")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("country 0?")
    page.goto(url + "#/?app=team")
    expect(rows).to_have_count(2)


# ---------------------------------------------------------------------- hostile content
PAYLOADS = ['<script>alert("script")</script>', '<img src=x onerror=alert("img")>',
            'javascript:alert("js")', "&lt;b&gt;&amp;&#60;entity", '"><svg onload=alert("svg")>',
            "'><iframe srcdoc='<script>alert(1)</script>'>"]
HOSTILE = " ".join(PAYLOADS)
INJECTED = ("img, iframe, script:not([src]), svg[onload], [onerror], [onload], "
            "a[href^='javascript']")


def _hostile_record(i: int, record_id: str) -> Any:
    from scrutiny import Record, RecordStatus, Span, TokenUsage

    t = 1_767_000_000.0 + i
    root = Span(f"{record_id}-0", None, HOSTILE, HOSTILE, t, t + 1, inputs={HOSTILE: HOSTILE},
                outputs=HOSTILE, error=HOSTILE, model=HOSTILE, usage=TokenUsage(1, 1, 2))
    child = Span(f"{record_id}-1", root.span_id, PAYLOADS[1], "tool", t + 0.1, t + 0.5,
                 inputs=PAYLOADS[0], outputs=PAYLOADS[4])
    return Record(app_name=HOSTILE, app_version=PAYLOADS[1], input=HOSTILE, output=HOSTILE,
                  record_id=record_id, status=RecordStatus.ERROR if i else RecordStatus.OK,
                  start_time=t, end_time=t + 1, spans=[root, child], contexts=PAYLOADS,
                  tags=PAYLOADS, metadata={HOSTILE: PAYLOADS}, error=HOSTILE if i else None,
                  framework=HOSTILE)


def _explained(output: str) -> tuple[float, str]:
    return 0.5, HOSTILE


def _raises(output: str) -> float:
    raise RuntimeError(HOSTILE)


def test_hostile_content_anywhere_is_shown_as_text(page: Any, dashboard: Dashboard) -> None:
    """HTML in every field a record, a span or a result has, in the page's own address and
    in error messages: shown as text, never parsed; a record whose id holds "/" opens (its
    address answered 404: "No such record")."""
    from urllib.parse import quote

    from playwright.sync_api import expect

    session = dashboard.session
    ids = ['"><img src=x onerror=alert(1)>', "../../etc/passwd", "a/b?c#d"]
    feedbacks = [Feedback(_explained, name=HOSTILE).on_output(),
                 Feedback(_raises, name=PAYLOADS[1]).on_output()]
    for i, rid in enumerate(ids):
        session.ingest(_hostile_record(i, rid), feedbacks)
    assert session.wait_for_feedback(30)
    url = dashboard.start()
    seen = SEEN[id(page)]

    def clean() -> None:
        assert page.locator(INJECTED).count() == 0
        assert seen.dialogs == []

    page.goto(url)
    expect(page.locator("#records tbody tr")).to_have_count(3)
    expect(page.locator("#leaderboard tbody tr").first).to_contain_text(PAYLOADS[0])
    expect(page.locator("#leaderboard thead")).to_contain_text(HOSTILE)
    expect(page.locator("#records tbody td.output").first).to_have_text(HOSTILE)
    expect(page.locator("#chart-scores .dist-row")).to_have_count(1)
    clean()
    for rid in ids:
        page.goto(url + "#/record/" + quote(rid, safe=""))
        view = page.locator("#record-view")
        expect(view.locator(".mono.muted").last).to_have_text(rid)
        expect(page.locator("#record-output")).to_have_text(HOSTILE)
        expect(view.locator(".card")).to_have_count(2)
        expect(view.locator(".card[data-status='done']")).to_contain_text(HOSTILE)
        for row in page.locator(".wf-row[data-span-id]").all():
            row.click()
        expect(page.locator(".wf-detail:visible")).to_have_count(2)
        clean()
    page.goto(url + "#/?q=" + quote(PAYLOADS[1]))  # (every record holds it)
    expect(page.locator("#filters input[name=q]")).to_have_value(PAYLOADS[1])
    expect(page.locator("#records-count")).to_have_text("3 matching")
    clean()
    page.goto(url + "#/?app=" + quote(PAYLOADS[4]))
    expect(page.locator("#records")).to_contain_text("No records match.")
    clean()
    for address, shown in [
            ("#/?feedback=x&min_score=" + quote(PAYLOADS[1]), "#error"),
            ("#/?status=" + quote(PAYLOADS[0]) + "&feedback=x", "#error"),
            ("#/record/" + PAYLOADS[1], "#record-missing")]:
        page.goto(url + address)
        expect(page.locator(shown)).to_contain_text("<")
        clean()


def test_feedback_names_like_object_members_are_plain_names(page: Any,
                                                            dashboard: Dashboard) -> None:
    """A row without a feedback named "constructor" (or "toString", "__proto__") showed
    Object.prototype's member as its cell ("—", "n=—") instead of nothing."""
    from playwright.sync_api import expect

    from scrutiny import Record

    session = dashboard.session
    names = ["__proto__", "constructor", "toString"]
    for i, name in enumerate(names):
        session.ingest(Record(app_name=f"app{i}", app_version="v", input=f"q{i}",
                              output="o", start_time=float(i), end_time=i + 1.0),
                       [Feedback(lambda output: 0.5, name=name).on_output()])
    assert session.wait_for_feedback(30)
    url = dashboard.start()
    page.goto(url)
    rows = page.locator("#leaderboard tbody tr")
    expect(rows).to_have_count(3)
    for i, name in enumerate(names):
        row = page.locator(f"#leaderboard tr[data-app='app{i}:v']")
        expect(row.locator("td[data-feedback]")).to_have_count(1)
        expect(row.locator(f"td[data-feedback='{name}'] .mean")).to_have_text("0.500")
        record = page.locator("#records tbody tr", has_text=f"q{i}")
        expect(record.locator("td[data-feedback]")).to_have_count(1)
        expect(record.locator(".badge")).to_have_count(1)  # (its status only)


# ---------------------------------------------------------------------- what the numbers say
def test_times_say_which_time_zone_they_are_in(browser: Any, served: Any) -> None:
    """Times were shown in the browser's zone with nothing saying so: 04:20 in New York
    read like the UTC 09:20 the record has."""
    from playwright.sync_api import expect

    _session, url, records = served
    context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                  timezone_id="America/New_York")
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        first = records[0]  # started at BASE: 2025-12-29 09:20:00 UTC, 04:20:00 in New York
        cell = page.locator(f"#records tr[data-record-id='{first.record_id}'] td").first
        expect(cell).to_have_text("2025-12-29 04:20:00")
        expect(page.locator("#records thead th").first.locator(".zone")).to_have_text(
            "America/New_York")
        assert "UTC\u221205:00" in (cell.get_attribute("title") or "")
        assert "2025-12-29T09:20:00Z" in (cell.get_attribute("title") or "")
        expect(page.locator("#chart-latency #latency-zone")).to_have_text(
            "times in America/New_York")
        cell.click()
        expect(page.locator("#record-view .facts").first).to_contain_text(
            "started 2025-12-29 04:20:00 UTC\u221205:00")
    finally:
        context.close()
    assert errors == []


def test_a_record_opened_from_its_address_colours_scores_by_their_direction(
        page: Any, served: Any) -> None:
    """Opened from its address (a link, a reload) rather than from the records table, a
    record's low score of a lower-is-better feedback was coloured as bad."""
    from playwright.sync_api import expect

    _session, url, records = served
    unsure = records[0]  # "I am not sure.": quality 0.2 (bad), verbosity 0.14 (low: good)
    page.goto(url + f"#/record/{unsure.record_id}")
    verbosity = page.locator(".card[data-feedback='verbosity'] .big")
    expect(verbosity).to_have_text("0.140")
    expect(verbosity).to_have_class(re.compile(r"\bgood\b"))
    expect(page.locator(".card[data-feedback='quality'] .big")).to_have_class(
        re.compile(r"\bbad\b"))


def test_means_that_look_equal_are_equally_best(page: Any, dashboard: Dashboard) -> None:
    """The leaderboard starred the best mean by exact float comparison: of two versions
    both showing 0.050, only the one whose mean was 0.05000000000000001 got the star."""
    from playwright.sync_api import expect

    from scrutiny import Record

    session = dashboard.session
    fb = Feedback(lambda output: 0.05, name="coverage").on_output()
    for i, version in enumerate(["a", "a", "a", "b"]):
        session.ingest(Record(app_name="app", app_version=version, input=f"q{i}",
                              output="o", start_time=float(i), end_time=i + 1.0), [fb])
    assert session.wait_for_feedback(30)
    means = session.get_leaderboard()["coverage"]
    assert len(set(means)) == 2  # (the database's float noise this test is about)
    url = dashboard.start()
    page.goto(url)
    cells = page.locator("#leaderboard td[data-feedback='coverage']")
    expect(cells).to_have_count(2)
    expect(cells.locator(".mean")).to_have_text(["0.050", "0.050"])
    expect(page.locator("#leaderboard td[data-feedback='coverage'].best")).to_have_count(2)


def test_a_refused_filter_does_not_leave_the_previous_records_on_screen(
        page: Any, served: Any) -> None:
    """A filter the server refused (min above max) showed its error over the records of the
    previous filters, with their count, as if they matched."""
    from playwright.sync_api import expect

    _session, url, _records = served
    page.goto(url)
    expect(page.locator("#records tbody tr")).to_have_count(8)
    page.goto(url + "#/?feedback=quality&min_score=0.9&max_score=0.1")
    expect(page.locator("#error")).to_contain_text("min_score 0.9 is above max_score 0.1")
    expect(page.locator("#records tbody tr")).to_have_count(0)
    expect(page.locator("#records #records-refused")).to_contain_text(
        "No records shown: min_score 0.9 is above max_score 0.1")
    expect(page.locator("#records-count")).to_have_text("")
    page.locator("#records-refused").get_by_role("link", name="clear them").click()
    expect(page.locator("#records tbody tr")).to_have_count(8)
    expect(page.locator("#error")).to_be_hidden()


def test_a_status_with_feedback_any_is_a_result_of_any_feedback(page: Any,
                                                                 served: Any) -> None:
    """Choosing Status with Feedback "any" rewrote the address to the alphabetically first
    feedback ("broken", which only fails): "0 matching" for records whose other feedbacks
    were done. A score range still needs one feedback, and says so."""
    from playwright.sync_api import expect

    session, url, _records = served
    page.goto(url)
    expect(page.locator("#records tbody tr")).to_have_count(8)
    page.locator("#filters select[name='status']").select_option("done")
    expected = session.query_records(statuses=["done"]).total
    assert expected > 0
    expect(page.locator("#records tbody tr")).to_have_count(expected)
    assert "feedback=" not in page.url
    page.goto(url + "#/?min_score=0.5")
    expect(page.locator("#error")).to_contain_text("needs feedback=<name>")


def test_the_records_list_says_why_a_call_or_a_result_failed(page: Any,
                                                              dashboard: Dashboard) -> None:
    """A row showed an "error" badge, an empty output and a "failed" badge: neither reason
    was anywhere in the list, and a lead opened every record to find them."""
    from playwright.sync_api import expect

    from scrutiny import Record
    from tests.test_dashboard_api import BROKEN

    record = dashboard.session.ingest(Record(
        app_name="qa", app_version="v1", input="q", output=None,
        error="RateLimitError: 429 Too Many Requests"), [BROKEN])
    assert dashboard.session.wait_for_feedback(20)
    page.goto(dashboard.start())
    row = page.locator(f"tr[data-record-id='{record.record_id}']")
    expect(row.locator("td.output")).to_have_text("RateLimitError: 429 Too Many Requests")
    expect(row.locator("td[data-feedback='broken']")).to_have_attribute(
        "title", re.compile("^broken: Select.output found nothing"))


def test_a_version_chosen_without_an_app_filters_the_leaderboard_too(
        page: Any, served: Any) -> None:
    """Version "v2" with app "all" filtered the records and the charts, but the leaderboard
    still ranked every version."""
    from playwright.sync_api import expect

    _session, url, _records = served
    page.goto(url)
    expect(page.locator("#leaderboard tbody tr")).to_have_count(3)
    page.locator("#filters select[name=version]").select_option("v2")
    expect(page.locator("#records tbody tr")).to_have_count(3)
    expect(page.locator("#leaderboard tbody tr")).to_have_count(1)
    expect(page.locator("#leaderboard tbody tr[data-app='qa:v2']")).to_have_count(1)
    expect(page.locator("#chart-scores .dist-row")).to_have_count(1)
    page.locator("#filters select[name=version]").select_option("v1")  # two apps have a v1
    expect(page.locator("#leaderboard tbody tr")).to_have_count(2)
    expect(page.locator("#records tbody tr")).to_have_count(5)


def test_a_record_without_a_result_says_so_in_the_records_table(page: Any,
                                                                 dashboard: Dashboard) -> None:
    """A record never evaluated with a feedback had an empty cell in that feedback's column,
    which read as a score that did not load."""
    from playwright.sync_api import expect

    session = dashboard.session
    judged = session.ingest(rag_record(1), [Feedback(lambda output: 0.5,
                                                     name="judged").on_output()])
    bare = session.ingest(rag_record(2), [])
    assert session.wait_for_feedback(30)
    url = dashboard.start()
    page.goto(url)
    expect(page.locator(f"tr[data-record-id='{judged.record_id}'] "
                        "td[data-feedback='judged']")).to_have_text("0.500")
    cell = page.locator(f"tr[data-record-id='{bare.record_id}'] td").last
    expect(cell).to_have_text("—")
    expect(cell).to_have_attribute("title", "not evaluated with judged")


def test_the_leaderboard_counts_skipped_results_beside_failed_ones(
        page: Any, dashboard: Dashboard) -> None:
    """The leaderboard's Pending / Running / Failed columns had no Skipped one: a version
    whose feedbacks found nothing to judge looked fully evaluated."""
    from playwright.sync_api import expect

    from scrutiny import Record, SkipFeedback

    def needs_contexts(output: str) -> float:
        raise SkipFeedback("there are no contexts to judge")

    session = dashboard.session
    for i in range(3):
        session.ingest(Record(app_name="sk", app_version="v1", input=f"q{i}", output="a"),
                       [Feedback(needs_contexts, name="grounded").on_output()])
    assert session.wait_for_feedback(30)
    url = dashboard.start()
    page.goto(url)
    row = page.locator("#leaderboard tr[data-app='sk:v1']")
    expect(page.locator("#leaderboard thead")).to_contain_text("Skipped")
    expect(row.locator("td[data-count='skipped']")).to_have_text("3")
    expect(row.locator("td[data-count='failed']")).to_have_text("0")


def test_a_latency_just_under_a_second_reads_as_seconds(page: Any, dashboard: Dashboard) -> None:
    """0.9996 s was rounded to "1000 ms" (the unit chosen before rounding)."""
    from playwright.sync_api import expect

    from scrutiny import Record

    session = dashboard.session
    rec = session.ingest(Record(app_name="timing", app_version="v1", input="q",
                                output="a", start_time=100.0, end_time=100.9996))
    assert session.wait_for_feedback(30)
    url = dashboard.start()
    page.goto(url)
    cell = page.locator(f"tr[data-record-id='{rec.record_id}'] td").nth(5)
    expect(cell).to_have_text("1.00 s")


def test_scores_wider_than_the_float_range_are_charted(page: Any, dashboard: Dashboard) -> None:
    """Scores from -1e308 to 1e308: the page drew the histogram over hi - lo = Infinity,
    its bins spanned NaN or Infinity and the mean (0) sat at the left edge."""
    from playwright.sync_api import expect

    from scrutiny import Record

    session = dashboard.session
    fb = Feedback(lambda output: float(output), name="extreme").on_output()
    for i, output in enumerate(["-1e308", "1e308"]):
        session.ingest(Record(app_name="big", app_version="v1", input=f"q{i}",
                              output=output), [fb])
    assert session.wait_for_feedback(30)
    url = dashboard.start()
    page.goto(url)
    row = page.locator("#chart-scores .dist-row[data-app='big:v1']")
    expect(row.locator(".counts")).to_have_text("n=2 · mean 0.000")
    expect(row.locator("line[stroke-dasharray]")).to_have_attribute("x1", "160")  # (W / 2)
    bins = row.locator("rect title")
    expect(bins).to_have_count(10)
    expect(bins).to_have_text(["-1e+308–-8e+307: 1 (50%)", "-8e+307–-6e+307: 0 (0%)",
                               "-6e+307–-4e+307: 0 (0%)", "-4e+307–-2e+307: 0 (0%)",
                               "-2e+307–0.00: 0 (0%)", "0.00–2e+307: 0 (0%)",
                               "2e+307–4e+307: 0 (0%)", "4e+307–6e+307: 0 (0%)",
                               "6e+307–8e+307: 0 (0%)", "8e+307–1e+308: 1 (50%)"])


@pytest.mark.parametrize("record_id", [".", ".."])
def test_a_record_whose_id_is_dots_opens(page: Any, dashboard: Dashboard,
                                         record_id: str) -> None:
    """The page asked for api/records/<id>: the browser resolved "." and ".." as dot
    segments (api/records/, api/), and the stored record read "No such record"."""
    from playwright.sync_api import expect

    from scrutiny import Record

    session = dashboard.session
    for rid in (".", "..", "x"):
        session.ingest(Record(app_name="dots", app_version="v1", input=f"id {rid}",
                              output=f"output of {rid}", record_id=rid))
    assert session.flush(10)
    url = dashboard.start()
    page.goto(url)
    page.locator(f"#records tr[data-record-id='{record_id}'] a").click()
    view = page.locator("#record-view")
    expect(view.locator(".record-head .mono.muted").last).to_have_text(record_id)
    expect(page.locator("#record-output")).to_have_text(f"output of {record_id}")
    expect(view.locator("#record-missing")).to_have_count(0)
    page.get_by_role("link", name="← All records").click()
    expect(page.locator("#records tbody tr")).to_have_count(3)

    page.goto(url + "#/record/" + record_id.replace(".", "%2E"))  # (its address, reloaded)
    expect(page.locator("#record-output")).to_have_text(f"output of {record_id}")
    expect(page.locator("#error")).to_be_hidden()


def test_apps_and_versions_stored_after_the_page_opened_are_filtered_and_listed(
        page: Any, dashboard: Dashboard) -> None:
    """The page turned the chosen app into the ids of the versions it saw when it opened,
    and never looked at the apps again: App "live" left out a version deployed since (3 of
    its 4 records missing), and neither dropdown ever listed a new app or version."""
    from playwright.sync_api import expect

    from scrutiny import Record

    session = dashboard.session
    n = 0

    def store(app: str, version: str, count: int = 1) -> None:
        nonlocal n
        for _ in range(count):
            n += 1
            session.ingest(Record(app_name=app, app_version=version, input=f"q{n}",
                                  output=f"a{n}", start_time=float(n), end_time=n + 0.5))
        assert session.flush(10)

    store("live", "v1")
    store("other", "v1")
    url = dashboard.start()
    form = page.locator("#filters")
    app, version = form.locator("select[name=app]"), form.locator("select[name=version]")
    count = page.locator("#records-count")
    page.goto(url)
    expect(count).to_have_text("2 matching")
    expect(app.locator("option")).to_have_text(["all", "live", "other"])

    store("live", "v2", 3)  # a version deployed while the page is open, then chosen
    app.select_option("live")
    expect(count).to_have_text("4 matching")
    expect(page.locator("#records tbody tr")).to_have_count(4)
    expect(page.locator("#leaderboard tbody tr")).to_have_count(2)
    expect(version.locator("option")).to_have_text(["all", "v1", "v2"])

    store("live", "v3", 2)  # and while an app is chosen: the next refresh has them
    store("new", "v1")
    expect(count).to_have_text("6 matching", timeout=WAIT_MS + 10_000)  # (idle: every 10 s)
    expect(page.locator("#leaderboard tbody tr")).to_have_count(3)
    expect(version.locator("option")).to_have_text(["all", "v1", "v2", "v3"])
    expect(app.locator("option")).to_have_text(["all", "live", "new", "other"])
    expect(app).to_have_value("live")  # (the choice kept)
    expect(version).to_have_value("")
    assert "app=live" in page.url

    version.select_option("v3")
    expect(count).to_have_text("2 matching")
    app.select_option("new")
    expect(count).to_have_text("1 matching")
    expect(version.locator("option")).to_have_text(["all", "v1"])
