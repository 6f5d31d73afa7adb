"""The full demo recipe, as the README's first command runs it (slow: minutes; CI runs it).

The thresholds are what the current demo reaches on a 2-core machine (docs/BENCHMARKS.md), with a margin; the
issue's target for the normalized score is 0.8, which the demo does not reach yet (measured: 0.487).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_meets_its_figures(tmp_path: Path) -> None:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "mopd", "demo", "--out", str(tmp_path / "demo")], check=True,
                   stdout=subprocess.DEVNULL, timeout=1500)
    wall = time.time() - t0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["domains"]) == {"reversal", "sorting", "shift"}
    for name, d in summary["domains"].items():
        assert d["teacher"] > d["start"], f"teacher for {name} does not beat the SFT start"
    assert summary["normalized_score"] is not None and summary["normalized_score"] >= 0.3
    assert wall <= 900  # the figure is 10 minutes on a quiet 2-core machine; CI machines are shared
