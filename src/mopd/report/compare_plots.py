"""The two figures of `mopd compare`, rendered to PNG bytes with matplotlib's Agg canvas (no pyplot).

compare_bars.png: per method, the recovery on each domain and the normalized score (the paper's headline
number), so a high mean from one lucky domain is visible. sample_efficiency.png: normalized score against
cumulative student samples, one line per method. When the comparison has intervals, each bar carries its 95%
interval as an error bar and each curve its band over seeds.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

DPI = 110


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def render_bars(methods: Mapping[str, Mapping], domains: Sequence[str], title: str) -> bytes:
    """Grouped bars: for each method, one bar per domain's recovery and a dark bar for the normalized score."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(methods)
    series = [(f"recovery: {d}", [methods[m]["domains"][d]["recovery"] for m in labels]) for d in domains]
    series.append(("normalized score", [methods[m]["normalized_score"] for m in labels]))
    cis = [[methods[m]["domains"][d].get("recovery_interval") for m in labels] for d in domains]
    cis.append([methods[m].get("normalized_interval") for m in labels])
    fig = Figure(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.2), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, (name, values) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(labels))]
        ys = [0.0 if v is None else float(v) for v in values]
        last = j == len(series) - 1
        bars = ax.bar(xs, ys, width, label=name, color="0.2" if last else f"C{j}", alpha=1.0 if last else 0.7,
                      yerr=_error_bars(ys, cis[j]), ecolor="0.35", capsize=2)
        if last:
            for b, v in zip(bars, values, strict=True):
                ax.annotate("n/a" if v is None else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="0.5", linestyle="--", linewidth=1)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=9)
    ax.set_ylabel("recovery of teacher gain")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, ncols=2)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _error_bars(ys: Sequence[float], cells: Sequence[Mapping | None]) -> list[list[float]] | None:
    """matplotlib's asymmetric yerr ([below], [above]) from interval cells; None when no bar has one."""
    if not any(c and c.get("ci") for c in cells):
        return None
    below, above = [], []
    for y, c in zip(ys, cells, strict=True):
        lo, hi = c["ci"] if c and c.get("ci") else (y, y)
        below.append(max(0.0, y - lo))
        above.append(max(0.0, hi - y))
    return [below, above]


def render_sample_efficiency(curves: Mapping[str, Sequence[tuple[float, float]]], title: str,
                             bands: Mapping[str, Sequence[Sequence[float]] | None] | None = None) -> bytes:
    """Normalized score (y) against cumulative student samples (x), one line per method; `bands`: per method,
    [x, lo, hi] points drawn as a shaded interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, pts) in enumerate(curves.items()):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label, color=f"C{i}")
        if band := (bands or {}).get(label):
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=f"C{i}",
                            alpha=0.2, linewidth=0)
    if not any(curves.values()):
        ax.text(0.5, 0.5, "no eval records (set eval_every on the methods' stages)", ha="center",
                transform=ax.transAxes)
    ax.axhline(1.0, color="0.5", linestyle="--", linewidth=1)
    ax.set_xlabel("student samples (rollouts)")
    ax.set_ylabel("normalized score")
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
