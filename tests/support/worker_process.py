"""Running `scrutiny worker` as a real process in the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_worker_until(args: list[str], marker: str,
                     env: dict[str, str] | None = None) -> tuple[str, int]:
    """Start ``scrutiny worker <args>``, read its log until a line holds `marker`, stop it
    with SIGTERM; returns (the whole log, its exit status)."""
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-m", "scrutiny.cli", "worker",
                             *args], stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if marker in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines) + rest, proc.returncode
