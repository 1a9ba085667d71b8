"""The study's figure: one PNG, a panel per :class:`~megarlhf.study.findings.Panel`, each curve
its mean over seeds with the spread (mean ± std) shaded and every run as a dot.

matplotlib is imported here only (``megarlhf study`` needs it; the rest of megarlhf does not),
with the Agg backend: no display needed.
"""

from __future__ import annotations

import io
import os

from megarlhf.checkpoint.atomic import write_file_atomic


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("megarlhf study draws its plots with matplotlib, which is not "
                              "installed: pip install matplotlib (a dependency of megarlhf; "
                              "reinstall with `pip install -e .`)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def draw(panels, path: str, title: str) -> str:
    """Draws ``panels`` into ``path`` (PNG, written atomically); returns the path."""
    plt = _pyplot()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(5.6 * n, 4.3), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for i, c in enumerate(panel.curves):
            if not c.x:
                continue
            color = f"C{(c.color if c.color is not None else i) % 10}"
            ax.plot(c.x, c.mean, marker="o" if len(c.x) < 30 else None, color=color,
                    label=c.label, linewidth=1.6, markersize=4)
            lo = [m - s for m, s in zip(c.mean, c.std)]
            hi = [m + s for m, s in zip(c.mean, c.std)]
            if any(s > 0 for s in c.std):
                ax.fill_between(c.x, lo, hi, color=color, alpha=0.18, linewidth=0)
            if c.points and len(c.points) > len(c.x) and len(c.x) < 30:
                ax.scatter([x for x, _ in c.points], [y for _, y in c.points], s=10,
                           color=color, alpha=0.5, zorder=3)
        if panel.xlog and all(x > 0 for c in panel.curves for x in c.x):
            ax.set_xscale("log", base=2)
            xs = sorted({x for c in panel.curves for x in c.x})
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
        elif not panel.xticks:
            xs = sorted({x for c in panel.curves for x in c.x})
            if 1 < len(xs) <= 8:
                ax.set_xticks(xs)
                ax.set_xticklabels([f"{x:g}" for x in xs])
        if panel.xticks:
            ax.set_xticks([x for x, _ in panel.xticks])
            ax.set_xticklabels([t for _, t in panel.xticks])
            ax.set_xlim(-0.5, len(panel.xticks) - 0.5)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if any(c.x for c in panel.curves):
            ax.legend(fontsize=8)
    import textwrap

    fig.suptitle(textwrap.fill(title, width=int(55 * n)), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_file_atomic(path, buf.getvalue())
    return path
