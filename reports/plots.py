"""The report's plots: matplotlib figures rendered off-screen (Agg, no pyplot global state) to base64 PNG
data URIs. Each function takes plain rows (already extracted from results.json) and returns a data URI, or
None when there is nothing to plot."""
from __future__ import annotations

import base64
import io
from typing import Any, Sequence

GIB = 1024 ** 3
PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def _figure(width: float = 6.4, height: float = 3.4):
    from matplotlib.figure import Figure  # Figure + savefig uses the Agg canvas; pyplot is never imported

    fig = Figure(figsize=(width, height), dpi=90)
    fig.set_layout_engine("constrained")
    return fig


def _to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _grouped_bars(ax, groups: Sequence[str], series: dict[str, Sequence[float | None]], ylabel: str) -> None:
    """Bars for `series` (label -> one value per group, None = absent) side by side within each group."""
    n = max(1, len(series))
    width = 0.8 / n
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width=width * 0.95, label=label, color=PALETTE[i % len(PALETTE)])
        for bar, v in zip(bars, values):
            if v is None:
                bar.set_alpha(0.0)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.25)  # head room for the legend
    if len(series) > 1:
        ax.legend(fontsize=7, ncols=min(len(series), 3), loc="upper center")


def memory_by_precision(precisions: Sequence[str], series: dict[str, Sequence[float | None]]) -> str | None:
    """series: memory kind ("weights", "CUDA allocated", "RSS", ...) -> bytes per precision (None = absent)."""
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    if not precisions or not series:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    _grouped_bars(ax, list(precisions), {k: [None if x is None else x / GIB for x in v] for k, v in series.items()},
                  "GiB")
    ax.set_title("Peak memory by precision (max over tasks)")
    return _to_data_uri(fig)


def throughput_by_precision(precisions: Sequence[str], series: dict[str, Sequence[float | None]]) -> str | None:
    """series: task label -> examples/s per precision."""
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    if not precisions or not series:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    _grouped_bars(ax, list(precisions), series, "examples / s")
    ax.set_title("Throughput by precision")
    return _to_data_uri(fig)


PRECISION_MARKERS = {"fp32": "o", "bf16": "s", "fp16": "^", "int8": "D"}


def accuracy_vs_memory(panels: dict[str, dict[str, list[tuple[str, float, float]]]],
                       metric_names: dict[str, str]) -> str | None:
    """panels: task -> series label (setting, protocol, model) -> [(precision, memory bytes, metric value)]; one
    panel per task, its headline metric (`metric_names[task]`) against peak memory. Nothing is written next to a
    point (labels would overlap where precisions cost the same memory): the marker says the precision, the colour
    the series, and the legends below the panels say which is which."""
    panels = {task: {k: v for k, v in series.items() if v} for task, series in panels.items()}
    panels = {task: series for task, series in panels.items() if series}
    if not panels:
        return None
    from matplotlib.lines import Line2D

    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    longest = max(len(series) for series in panels.values())
    fig = _figure(width=5.2 * cols, height=rows * (3.0 + 0.16 * ((longest + 1) // 2)) + 0.4)
    used: dict[str, None] = {}
    for i, (task, series) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, (label, pts) in enumerate(series.items()):
            pts = sorted(pts, key=lambda p: p[1])
            colour = PALETTE[j % len(PALETTE)]
            ax.plot([p[1] / GIB for p in pts], [p[2] for p in pts], color=colour, alpha=0.6, label=label)
            for precision, x, y in pts:
                used.setdefault(precision, None)
                ax.plot([x / GIB], [y], linestyle="none", marker=PRECISION_MARKERS.get(precision, "x"),
                        color=colour, markersize=6)
        ax.set_title(f"{task} ({metric_names.get(task, 'headline metric')})", fontsize=9)
        ax.set_xlabel("peak memory (GiB)", fontsize=8)
        ax.set_ylabel(metric_names.get(task, "headline metric"), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    markers = [Line2D([], [], linestyle="none", marker=PRECISION_MARKERS.get(p, "x"), color="#555555", label=p)
               for p in used]
    # the figure's caption names the plot: a title here would sit on top of this legend
    fig.legend(handles=markers, loc="outside upper center", ncols=len(markers) + 1, fontsize=8, frameon=False,
               title="one point per precision (marker):", title_fontsize=8, alignment="center")
    return _to_data_uri(fig)


def latency_by_precision(panels: dict[str, dict[str, dict[str, Any]]]) -> str | None:
    """panels: task label -> precision -> {"p50", "p90", "p99"} in ms; one subplot per task."""
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    n = len(panels)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = _figure(width=max(6.4, 3.4 * cols), height=3.0 * rows)
    for i, (label, by_precision) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        precisions = list(by_precision)
        series = {q: [_num(by_precision[p].get(q)) for p in precisions] for q in ("p50", "p90", "p99")}
        _grouped_bars(ax, precisions, series, "ms / example")
        ax.set_title(label, fontsize=9)
    fig.suptitle("Latency percentiles by precision")
    return _to_data_uri(fig)


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None
