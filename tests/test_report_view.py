"""The HTML report looked at: a report built from a small real run, opened in headless Chromium, has no console
or page errors and every figure decodes; per-step curves carry a smoothed line (a debiased EMA) over the raw one.
"""

from __future__ import annotations

import importlib
import math
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest
from rich.console import Console

from mopd.execution.runner import run_recipe
from mopd.recipe.load import load_recipe
from mopd.report.plots import RAW_ALPHA, _render, ema, smoothing_weight

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

# a base long enough (32 steps) that its curves are drawn smoothed, and a tiny MOPD student so there is a report
RECIPE = textwrap.dedent(
    """\
    name: viewed
    seed: 0
    domains: [reversal, sorting]
    eval: {size: 8, max_new_tokens: 6}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 32
        batch_size: 8
      teacher_rev: {kind: rlvr, init: base, domains: [reversal], steps: 2, batch_size: 2, group_size: 4}
      teacher_sort: {kind: rlvr, init: base, domains: [sorting], steps: 2, batch_size: 2, group_size: 4}
      student:
        kind: mopd
        init: base
        teachers: {reversal: teacher_rev, sorting: teacher_sort}
        steps: 3
        batch_size: 2
        group_size: 2
    """
)


def test_ema_is_debiased_and_follows_a_step() -> None:
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull toward zero at the start
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])
    smoothed = ema([0.0] * 20 + [1.0] * 20, 0.8)
    assert smoothed[19] == 0.0 and 0 < smoothed[20] < smoothed[25] < smoothed[39] < 1.0
    assert smoothed[39] == pytest.approx((1 - 0.8**20) / (1 - 0.8**40), rel=1e-9)
    out = ema([1.0, math.nan, 3.0], 0.5)
    assert math.isnan(out[1]) and out[2] == pytest.approx(ema([1.0, 3.0], 0.5)[1])
    assert ema([4.0, 5.0], 0.0) == [4.0, 5.0]


def test_smoothing_weight_grows_with_the_curve() -> None:
    assert smoothing_weight(10) == 0.0 and smoothing_weight(30) == 0.0  # short curves: markers, no smoothing
    assert smoothing_weight(100) == pytest.approx(0.9)
    assert smoothing_weight(40) < smoothing_weight(100) < smoothing_weight(5000) == 0.98


def test_long_curves_are_drawn_raw_and_faint_under_their_smoothed_line(monkeypatch) -> None:
    from matplotlib.axes import Axes

    drawn: list[dict] = []
    real = Axes.plot

    def spy(self, xs, ys, *args, **kwargs):
        drawn.append({"ys": list(ys), **kwargs})
        return real(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    noisy = [(i, float(i % 2)) for i in range(1, 101)]
    short = [(i, float(i)) for i in range(1, 6)]
    png = _render({"long": {"entropy": noisy}, "short": {"entropy": short}}, ["long", "short"],
                  [("entropy", "entropy")], "t", "entropy")
    assert png.startswith(b"\x89PNG")
    raw, smooth, few = drawn
    assert raw["alpha"] == RAW_ALPHA and "label" not in raw and raw["ys"] == [v for _, v in noisy]
    assert smooth["label"] == "long" and smooth["ys"] == pytest.approx(ema(raw["ys"], 0.9))
    assert max(smooth["ys"][50:]) - min(smooth["ys"][50:]) < 0.2  # the 0/1 noise is averaged out
    assert few["label"] == "short" and few["marker"] == "o" and "alpha" not in few


@pytest.fixture
def browser_script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    module = importlib.import_module("report_in_browser")
    yield module
    sys.modules.pop("report_in_browser", None)


def test_the_report_renders_in_headless_chromium(tmp_path: Path, browser_script) -> None:
    if find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if browser_script.find_chromium() is None:
        pytest.skip("no Chromium binary (bash scripts/setup.sh --dev installs Debian's chromium-headless-shell)")
    (tmp_path / "viewed.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    run_recipe(load_recipe(tmp_path / "viewed.yaml"), out, Console(quiet=True))
    figures = sorted(p.name for p in out.glob("*.png"))
    assert "entropy.png" in figures and "reward.png" in figures
    result = browser_script.inspect_report(out, screenshot=tmp_path / "shot.png")
    assert result["errors"] == []
    assert result["title"].startswith("MOPD report: viewed")
    assert len(result["images"]) == len(figures)  # every figure the run wrote is on the page
    assert all(img["complete"] and img["width"] > 0 for img in result["images"]), result["images"]
    assert (tmp_path / "shot.png").read_bytes().startswith(b"\x89PNG")
