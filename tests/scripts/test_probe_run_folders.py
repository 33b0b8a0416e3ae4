"""scripts/probe_run_folders.py: every run-folder and export case of issue 43, as a user meets
it on the command line. About 30 subprocesses (14.6 minutes wall, 3.5 CPU-minutes, on a busy
2-core machine), so slow; the fast in-process checks of the same pieces are in
tests/lit/test_run_folders.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "probe_run_folders.py"


@pytest.mark.slow
def test_probe_run_folders_passes_every_case(tmp_path: Path) -> None:
    out = tmp_path / "outcomes.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    outcomes = json.loads(out.read_text())
    assert len(outcomes) == 14 and all(o["ok"] for o in outcomes)
    # Each refusal is a line the user can act on, not a traceback.
    for o in outcomes:
        if o["want"] != 0:
            assert "Traceback" not in o["line"] and o["line"], o
