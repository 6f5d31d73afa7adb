"""Training curves over steps, rendered to PNG bytes with matplotlib's Agg canvas.

Uses `matplotlib.figure.Figure` + `FigureCanvasAgg` directly (no pyplot), so rendering never touches
the global backend or leaks figures. matplotlib is imported lazily: importing mopd.report stays cheap.

A long per-step curve is noisy (one batch per step), so it is drawn raw and faint with a smoothed line over it,
as TensorBoard and W&B draw theirs: the trend reads at a glance and the spread stays visible.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from ..core.run_dir import FIGURES

# stage -> metric key -> [(step, value)] sorted by step
Curves = Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]

FIGURE_NAMES = FIGURES  # named once in core.run_dir: a stage may not take one of these names
DPI = 110
_MARKERS_BELOW = 30  # draw point markers (and no smoothed line) when a line has at most this many points
RAW_ALPHA = 0.25  # the raw curve under a smoothed one


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the average of the first values is not pulled
    toward zero): s_i = w s_{i-1} + (1 - w) v_i, shown as s_i / (1 - w^n) after n finite values. A non-finite
    value is passed through and left out of the average."""
    out: list[float] = []
    last, n = 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        n += 1
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


def smoothing_weight(points: int) -> float:
    """The EMA weight for a curve of `points` points: an effective window of about a tenth of the curve
    (weight 0.9 at 100 points), at most 0.98; 0 (no smoothing) for curves short enough to draw with markers."""
    if points <= _MARKERS_BELOW:
        return 0.0
    return min(0.98, 1 - 10 / points)


def _reward_panels(keys: set[str]) -> list[tuple[str, str]]:
    panels = [("reward/mean", "mean reward")] if "reward/mean" in keys else []
    for k in sorted(keys):
        if k.startswith("reward/") and k != "reward/mean":
            panels.append((k, f"reward: {k[len('reward/') :]}"))
    return panels


def _kl_panels(keys: set[str]) -> list[tuple[str, str]]:
    prefix = "mopd/reverse_kl/"
    panels = [(k, f"reverse KL to teacher {k[len(prefix) :]}") for k in sorted(keys) if k.startswith(prefix)]
    if "opd/reverse_kl" in keys:
        panels.append(("opd/reverse_kl", "reverse KL to teacher (OPD)"))
    return panels


def _per_teacher_panels(prefix: str, label: str):
    """One panel per teacher for the keys `<prefix><teacher>`."""

    def choose(keys: set[str]) -> list[tuple[str, str]]:
        return [(k, f"{label} {k[len(prefix) :]}") for k in sorted(keys) if k.startswith(prefix)]

    return choose


# file -> (figure title, y label, panel chooser)
_FIGURES = {
    "reward.png": ("Reward", "mean verifier reward", _reward_panels),
    "reverse_kl.png": ("Reverse KL (student || teacher)", "reverse KL", _kl_panels),
    "entropy.png": (
        "Policy entropy",
        "entropy",
        lambda ks: [("entropy", "entropy")] if "entropy" in ks else [],
    ),
    "completion_len.png": (
        "Completion length",
        "completion length (tokens)",
        lambda ks: [("completion_len", "completion length")] if "completion_len" in ks else [],
    ),
    "routing_share.png": (
        "Routing share (fraction of rows per teacher)",
        "routing share",
        _per_teacher_panels("mopd/routing_share/", "rows routed to"),
    ),
    "is_dropped.png": (
        "Importance sampling: tokens dropped (truncate) or clipped (clip)",
        "fraction of tokens",
        lambda ks: [("is/dropped_frac", "IS-dropped fraction")] if "is/dropped_frac" in ks else [],
    ),
    "teacher_nll.png": (
        "Teacher NLL of the student's rollouts (rising = student leaves the teacher's support)",
        "-log pi_T(y_t)",
        _per_teacher_panels("mopd/teacher_nll/", "NLL under teacher"),
    ),
}


def render_figures(curves: Curves, stage_order: Sequence[str], recipe: str = "") -> dict[str, bytes]:
    """Render every figure that has data; returns {file name: PNG bytes} (figures with no data are absent).

    Each panel is one metric key, with one line per stage that logs it. A stage keeps the same colour
    in every figure (its position in `stage_order`).
    """
    keys = {k for per_key in curves.values() for k, pts in per_key.items() if pts}
    out: dict[str, bytes] = {}
    for name, (title, ylabel, choose) in _FIGURES.items():
        panels = choose(keys)
        if panels:
            full_title = f"{recipe}: {title}" if recipe else title
            out[name] = _render(curves, stage_order, panels, full_title, ylabel)
    return out


def _render(
    curves: Curves, stage_order: Sequence[str], panels: list[tuple[str, str]], title: str, ylabel: str
) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    palette = [f"C{i}" for i in range(10)]
    order = list(stage_order) + [s for s in curves if s not in stage_order]
    colour = {s: palette[i % len(palette)] for i, s in enumerate(order)}

    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.5 * nrows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    smoothed = False
    for ax, (key, panel_title) in zip(axes, panels, strict=False):
        for stage in order:
            pts = (curves.get(stage) or {}).get(key) or []
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            weight = smoothing_weight(len(pts))
            if weight == 0.0:
                ax.plot(xs, ys, label=stage, color=colour[stage], marker="o", markersize=3, linewidth=1.4)
                continue
            ax.plot(xs, ys, color=colour[stage], alpha=RAW_ALPHA, linewidth=1.0)
            ax.plot(xs, ema(ys, weight), label=stage, color=colour[stage], linewidth=1.6)
            smoothed = True
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, title="stage", title_fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=12)
    if smoothed:
        fig.text(0.995, 0.005, "faint: each step; solid: exponential moving average", ha="right", va="bottom",
                 fontsize=7, alpha=0.7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
