"""The PostgreSQL server the tests use: `SCRUTINY_TEST_POSTGRES_URL` (`.ci/postgres.sh` starts
one and prints it). Without it a PostgreSQL test is skipped — unless
`SCRUTINY_REQUIRE_POSTGRES=1` (set by `.ci/run`), which makes that a failure."""

from __future__ import annotations

import os

import pytest


def postgres_url() -> str:
    """The test server's URL; skips (or fails, when required) without one."""
    url = os.environ.get("SCRUTINY_TEST_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("SCRUTINY_REQUIRE_POSTGRES") == "1":
        pytest.fail("SCRUTINY_REQUIRE_POSTGRES=1 but SCRUTINY_TEST_POSTGRES_URL is not set: "
                    "the PostgreSQL server did not start")
    pytest.skip("set SCRUTINY_TEST_POSTGRES_URL to run this test on PostgreSQL "
                '(eval "$(.ci/postgres.sh)" starts a server and sets it)')
