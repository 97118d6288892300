"""PNG plots for the benchmarks (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def line_plot(path: Path, x: list, series: dict[str, list], xlabel: str, ylabel: str, title: str) -> Path:
    return line_plots(path, x, xlabel, [(title, ylabel, series)])


def line_plots(path: Path, x: list, xlabel: str, panels: list[tuple[str, str, dict[str, list]]],
               suptitle: str | None = None) -> Path:
    """One panel per (title, ylabel, series), side by side, x on a log2 axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], panels):
        for label, ys in series.items():
            ax.plot(x, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_plot(path: Path, labels: list[str], values: list[float], ylabel: str, title: str,
             reference: float | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    bars = ax.bar(labels, values, color="#4c72b0")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="#c44e52", linestyle="--", linewidth=1, label="0.8 x base")
        ax.legend()
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
