"""The scaling curves' figure of `real_shape.py curves`: step time and peak RSS against each axis, one panel per
axis, one colour per tool in every panel, an out-of-memory point marked where it would be."""

from __future__ import annotations

from pathlib import Path


def plot(curve_data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(curve_data), figsize=(5 * len(curve_data), 8), squeeze=False)
    tools = list(dict.fromkeys(t for points in curve_data.values() for t in points[0]["median"]))
    color = {t: f"C{i}" for i, t in enumerate(tools)}  # one color per tool in every panel
    for col, (axis, points) in enumerate(curve_data.items()):
        xs = [p["shape"][axis] for p in points]
        for tool in points[0]["median"]:
            for row, (key, label) in enumerate((("step_s", "step time (s)"), ("peak_rss_mib", "peak RSS (MiB)"))):
                ys = [p["median"][tool][key] for p in points]
                ok = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
                ax = axes[row][col]
                if ok:
                    ax.plot(*zip(*ok, strict=True), marker="o", label=tool, color=color[tool])
                for x, y in zip(xs, ys, strict=True):
                    if y is None:
                        ax.annotate(f"{tool}: OOM", (x, 0), fontsize=7, rotation=90, va="bottom")
                ax.set_xscale("log", base=2)
                ax.set_xlabel(axis)
                ax.set_ylabel(label)
                ax.legend(fontsize=7)
        fixed = {k: v for k, v in points[0]["shape"].items() if k != axis}
        axes[0][col].set_title(f"{axis} ({', '.join(f'{k} {v}' for k, v in fixed.items())})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
