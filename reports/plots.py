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


def accuracy_vs_memory(points: dict[str, list[tuple[str, float, float]]], metric_names: dict[str, str]) -> str | None:
    """points: task label -> [(precision, memory bytes, headline metric value)]; one line per task."""
    points = {k: v for k, v in points.items() if v}
    if not points:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, (label, pts) in enumerate(points.items()):
        pts = sorted(pts, key=lambda p: p[1])
        xs = [p[1] / GIB for p in pts]
        ys = [p[2] for p in pts]
        ax.plot(xs, ys, marker="o", color=PALETTE[i % len(PALETTE)], label=f"{label} ({metric_names.get(label, '')})")
        for precision, x, y in zip((p[0] for p in pts), xs, ys):
            ax.annotate(precision, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("headline metric")
    ax.set_title("Accuracy vs memory, one point per precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
