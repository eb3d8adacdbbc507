"""The README, run as a reader runs it, so it cannot drift from the code unnoticed.

Every ```python block of README.md runs in a fresh temporary folder, in a Python process of
its own (the default SQLite database lands in that folder), within a timeout; a block that
raises fails its test. A block runs exactly as it is unless a `Plan` below says otherwise,
and says why: it continues an earlier block (it uses that block's names), a prelude stands
for what the reader brings (a real model, their own TruLens app), or — for a block that
cannot run offline at all — it is skipped with the reason. A plan's postlude checks what the
README says about the block's result. A new block is run as it is: one that cannot run
fails here until it is given a plan.

The processes start together (when the first block's test runs) and each test waits for its
own: the blocks (a few seconds each) run side by side rather than one after another.

The README's `scrutiny ...` command lines and `--options`, and the extras it tells readers
to install, are checked against the CLI and pyproject.toml.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from scrutiny import ConfigurationError, Feedback, RetryPolicy, Session

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 90.0  # seconds per block; each takes a few


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one README block is run when it cannot run exactly as it is."""

    marker: str
    """A line of the block that identifies it (must be in exactly one block)."""
    why: str
    """Why the block needs more than itself (shown when it fails)."""
    after: str | None = None
    """The marker of the block this one continues: that block runs first, in one script."""
    prelude: str = ""
    """Code run before the block: it stands for what the reader brings."""
    postlude: str = ""
    """Code run after the block: checks of what the README says the block does."""
    files: tuple[tuple[str, str], ...] = ()
    """Files written in the block's folder first (path, text)."""
    skip: str | None = None
    """Not executed at all, for this reason (e.g. it needs a real API key)."""


QUICKSTART = 'recorder = ChainRecorder(chain, app_name="qa", app_version="v1"'

MY_FEEDBACKS = '''\
from scrutiny import Feedback


async def relevance(question: str, answer: str) -> float:
    asked = set(question.lower().split())
    return len(asked & set(answer.lower().split())) / max(len(asked), 1)


f_rel = Feedback(relevance).on_input_output()
'''

PLANS = (
    Plan(
        QUICKSTART,
        why="runs as it is; the postlude checks the results and the tables it describes",
        postlude='''
            results = record.wait_for_feedback_results(timeout=30)
            assert {f.name for f in results} == {"length", "relevance", "context_ok"}, results
            assert all(r.status.value == "done" for r in results.values()), results
            assert record.contexts == docs, record.contexts
            assert results[f_ctx].result == 0.5, results[f_ctx]   # once per doc, averaged
            assert sorted(feedback_columns) == ["context_ok", "length", "relevance"]
            for name in feedback_columns:
                assert f"{name} status" in df.columns, df.columns
            assert len(df) == 1 and df.loc[0, "input"] == record.input, df
            board = session.get_leaderboard()
            assert list(board.index) == [("qa", "v1")], board
            assert Path("scrutiny.sqlite").exists()       # the embedded default
        ''',
    ),
    Plan(
        "def test_answers_are_long_enough(session):",
        why="a test module: it uses the quickstart's chain, and pytest runs it (the "
            "postlude runs pytest on this very file)",
        after=QUICKSTART,
        postlude='''
            if __name__ == "__main__":
                import pytest as _pytest

                raise SystemExit(_pytest.main(["-q", "-p", "no:cacheprovider", __file__]))
        ''',
    ),
    Plan(
        'chain.invoke(x, config={"callbacks": [recorder]})',
        why="continues the quickstart (its chain, recorder and f_len)",
        after=QUICKSTART,
        postlude='''
            frame, _ = session.get_records_and_feedback()
            assert len(frame) == 3, frame                 # one record per root call
            assert list(frame["input"][:2]) == [x["question"]] * 2, frame
        ''',
    ),
    Plan(
        "recorder = LlamaIndexRecorder(query_engine",
        why="runs as it is; the postlude checks its record",
        postlude='''
            record = recording.get()
            results = record.wait_for_feedback_results(timeout=30)
            assert all(r.status.value == "done" for r in results.values()), results
            assert record.contexts and record.output, record
        ''',
    ),
    Plan(
        "judge = LLMJudge(any_langchain_chat_model_or_llamaindex_llm,",
        why="the placeholder stands for the reader's model (a real one needs an API key): "
            "a scripted fake model stands in for it",
        prelude='''
            from langchain_core.language_models.fake_chat_models import FakeListChatModel

            any_langchain_chat_model_or_llamaindex_llm = FakeListChatModel(
                responses=['{"score": 8, "reasons": "scripted"}'])
        ''',
        postlude='''
            names = [f.name for f in feedbacks]
            assert len(names) == len(set(names)) == 10, names
            assert "politeness" in names
        ''',
    ),
    Plan(
        "from my_feedbacks import f_rel",
        why="continues the quickstart (its chain); my_feedbacks is the reader's module",
        after=QUICKSTART,
        files=(("my_feedbacks.py", MY_FEEDBACKS),),
        postlude='''
            with recorder as recording:
                chain.invoke({"question": "Is it wet in Ireland?"})
            pending = recording.get().feedback_results
            assert [r.status.value for r in pending.values()] == ["pending"], pending
            assert session.resume_pending(30) == 1        # how many results it claimed
            frame, _ = session.get_records_and_feedback(limit=1)
            assert frame.loc[0, "relevance status"] == "done", frame
        ''',
    ),
    Plan(
        "from scrutiny.compat.trulens import",
        why="`chain` and `relevance` are the reader's TruLens app: a small fake stands in",
        prelude='''
            from langchain_core.language_models.fake_chat_models import FakeListChatModel
            from langchain_core.output_parsers import StrOutputParser
            from langchain_core.prompts import ChatPromptTemplate

            chain = (ChatPromptTemplate.from_template("{question}")
                     | FakeListChatModel(responses=["Paris."]) | StrOutputParser())

            def relevance(question: str, answer: str) -> float:
                return 1.0
        ''',
        postlude='''
            frame, columns = session.get_records_and_feedback()
            assert columns == ["Answer Relevance"], columns
            assert list(frame["Answer Relevance"]) == [1.0], frame
        ''',
    ),
)


def _read_readme() -> str:
    return README.read_text(encoding="utf-8")


def python_blocks(text: str) -> list[str]:
    """The README's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def _plan_of(block: str) -> Plan | None:
    lines = block.splitlines()
    found = [p for p in PLANS if any(p.marker in line for line in lines)]
    assert len(found) <= 1, f"several plans match one README block: {found}"
    return found[0] if found else None


def _block_with(marker: str, blocks: list[str]) -> str:
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, (f"{len(found)} README python blocks contain {marker!r} (a plan "
                             f"in tests/test_readme.py names a block the README no longer has)")
    return found[0]


def _script(block: str, plan: Plan | None, blocks: list[str]) -> str:
    parts = ["from pathlib import Path  # (for the checks)\n"]
    if plan is not None:
        parts.append(textwrap.dedent(plan.prelude))
        if plan.after is not None:
            parts.append(_block_with(plan.after, blocks))
    parts.append(block)
    if plan is not None:
        parts.append(textwrap.dedent(plan.postlude))
    return "\n".join(parts)


BLOCKS = python_blocks(_read_readme())
IDS = [f"block{i}-" + re.sub(r"\W+", "_", b.strip().splitlines()[0])[:40].strip("_")
       for i, b in enumerate(BLOCKS)]


class _Runs:
    """Every block's process, started together on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[int, tuple[subprocess.Popen[str], Path]] = {}

    def start_all(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCRUTINY_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                          env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        for i, block in enumerate(BLOCKS):
            plan = _plan_of(block)
            if plan is not None and plan.skip:
                continue
            folder = self.root / f"block{i}"
            folder.mkdir()
            for name, text in plan.files if plan else ():
                (folder / name).write_text(text, encoding="utf-8")
            script = folder / "readme_block.py"
            script.write_text(_script(block, plan, BLOCKS), encoding="utf-8")
            # (output to files: a pipe that is read only when its test comes would stall a
            # block that prints much)
            with open(folder / "stdout.txt", "w") as out, \
                    open(folder / "stderr.txt", "w") as err:
                proc = subprocess.Popen(  # (a list, no shell)
                    [sys.executable, script.name], cwd=folder, env=env, stdout=out,
                    stderr=err)
            self.procs[i] = (proc, script)

    def result(self, i: int) -> tuple[int, str, str, Path]:
        proc, script = self.procs[i]
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        out = (script.parent / "stdout.txt").read_text(errors="replace")
        err = (script.parent / "stderr.txt").read_text(errors="replace")
        if code is None:
            pytest.fail(f"README block {i} did not finish in {TIMEOUT:g} s\n{err[-3000:]}")
        return code, out, err, script

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Runs]:
    started = _Runs(tmp_path_factory.mktemp("readme"))
    try:
        started.start_all()
        yield started
    finally:
        started.stop()


def test_readme_has_the_blocks_the_plans_name() -> None:
    assert len(BLOCKS) >= 6, "the README's python blocks were not found"
    for plan in PLANS:
        _block_with(plan.marker, BLOCKS)
        if plan.after is not None:
            _block_with(plan.after, BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=IDS)
def test_readme_python_block_runs(index: int, runs: _Runs) -> None:
    plan = _plan_of(BLOCKS[index])
    if plan is not None and plan.skip:
        pytest.skip(f"not executed: {plan.skip}")
    code, out, err, script = runs.result(index)
    assert code == 0, (
        f"README python block {index} failed (exit {code})"
        + (f"; it is run with: {plan.why}" if plan else ", run as it is")
        + f"\n--- script {script}\n{script.read_text()}\n--- stdout\n{out[-2000:]}"
        + f"\n--- stderr\n{err[-4000:]}")


# ------------------------------------------------------------------------- the CLI
def _command_lines(text: str) -> list[str]:
    """`scrutiny ...` commands of the README: lines of its bash blocks, inline code."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            if command.startswith("scrutiny "):
                lines.append(command)
    lines += re.findall(r"`(scrutiny [a-z][^`]*)`", text)
    return lines


def test_readme_cli_commands_and_options_exist() -> None:
    import click
    from click.testing import CliRunner

    from scrutiny.cli import main

    text = _read_readme()
    commands = _command_lines(text)
    assert any(c.startswith("scrutiny worker") for c in commands), commands
    for command in commands:
        args = shlex.split(command)[1:]
        result = CliRunner().invoke(main, [*args, "--help"])
        assert result.exit_code == 0, f"README command {command!r}: {result.output}"

    options: set[str] = set()

    def collect(cmd: click.Command) -> None:
        for param in cmd.params:
            options.update(o for o in param.opts if o.startswith("--"))
        for sub in getattr(cmd, "commands", {}).values():
            collect(sub)

    collect(main)
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert mentioned, "no --option found in the README"
    assert mentioned <= options, f"README options no command has: {mentioned - options}"


def test_readme_extras_exist() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"])
    text = _read_readme()
    named = set(re.findall(r"scrutiny\[([\w-]+)\]", text))
    named |= set(re.findall(r"`\[([a-z-]+)\]`", text))
    assert {"langchain", "dashboard", "postgres"} <= named, named
    assert named <= extras, f"README extras pyproject.toml does not have: {named - extras}"


# -------------------------------------------------- what the README says in prose
def readme_score(output: str) -> float:
    """A feedback function a worker can import (tests.test_readme:readme_score)."""
    return 1.0


def readme_context_score(context: str) -> float:
    return 1.0


class _Detector:
    def __call__(self, output: str) -> float:
        return 0.0


def test_deferred_refusals_say_why_and_what_to_do() -> None:
    """README: a lambda, a closure, a bound method, a callable object or a function of
    `__main__` — as the function, a selector, its aggregate or its `retry_on` — is refused
    when the recorder is created, "with the reason and what to do"."""

    class LocalError(Exception):
        pass

    cases = {
        "a callable object": (Feedback(_Detector(), name="pii").on_output(),
                              "_Detector(...) is a callable object", "module-level function"),
        "a partial": (Feedback(functools.partial(readme_score), name="p").on_output(),
                      "partial(...) is a callable object", "module-level function"),
        "an aggregate lambda": (
            Feedback(readme_context_score, aggregate=lambda xs: max(xs)).on_contexts(),
            "its aggregate function: a lambda", "define the function with `def`"),
        "a local retry_on type": (
            Feedback(readme_score, retry=RetryPolicy(attempts=2, retry_on=(LocalError,))
                     ).on_output(),
            "its RetryPolicy.retry_on:", "define it at module level"),
    }
    session = Session("memory://", feedback_mode="deferred")
    try:
        for what, (feedback, reason, todo) in cases.items():
            with pytest.raises(ConfigurationError) as caught:
                session.check_feedbacks([feedback])
            message = str(caught.value)
            assert reason in message, f"{what}: {message}"
            assert todo in message, f"{what}: {message}"
        session.check_feedbacks([Feedback(readme_score).on_output()])  # (importable: fine)
    finally:
        session.close()


def test_resume_pending_evaluates_what_this_session_just_recorded(tmp_path: Path) -> None:
    """README: in deferred mode the app stores the record and its pending results, and
    `session.resume_pending(timeout)` evaluates them "once" and "returns how many results it
    claimed" — also right after the recording, in the process that made it (its writes were
    still queued, and it claimed nothing)."""
    from scrutiny import Record

    session = Session(f"sqlite:///{tmp_path}/t.sqlite", feedback_mode="deferred")
    try:
        record = Record("app", "v1", input="question", output="answer")
        session.ingest(record, [Feedback(readme_score).on_output()])
        assert session.resume_pending(30) == 1
        frame, _ = session.get_records_and_feedback()
        assert list(frame["readme_score status"]) == ["done"], frame
        assert list(frame["readme_score"]) == [1.0], frame
    finally:
        session.close()
