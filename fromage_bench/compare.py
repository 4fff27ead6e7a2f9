"""`fromage-bench compare BASE NEW`: deltas between two runs and a verdict for CI.

A record of NEW regresses against the matching record of BASE when a metric falls by more than
`metric_tol` points (or a lower-is-better metric such as mean_rank rises by more), when it got slower by
more than `speed_tol` (relative), or when its peak memory or weight bytes grew by more than `memory_tol`
(relative). A record of BASE missing from NEW is a regression too (a task that stopped running).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from model.errors import FromageInputError

from .results import read_results

LOWER_IS_BETTER = ("mean_rank", "median_rank")
MEMORY_KEYS = ("cuda_max_allocated_bytes", "nvml_process_used_bytes", "cpu_rss_bytes")


@dataclass
class Row:
    key: str
    quantity: str
    base: float | None
    new: float | None
    change: str
    regressed: bool


def parse_tolerance(text: str | float, name: str, percent: bool) -> float:
    """'10%' -> 0.10 for relative tolerances; '0.5' -> 0.5 points for metrics."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100.0
            if not percent:
                raise FromageInputError(f"--{name}", "takes metric points, not a percentage")
            return value
        value = float(raw)
        return value / 100.0 if percent and value > 1 else value
    except ValueError:
        raise FromageInputError(f"--{name} {raw!r}", "not a number") from None


def record_key(r: dict) -> str:
    if r.get("kind") == "profile":
        return f"profile {r['scenario']} {json.dumps(r.get('params', {}), sort_keys=True)} @{r['precision']}"
    return f"{r['task']}:{r['setting']} [{r.get('protocol')}] @{r['precision']}"


def _lower_is_better(metric: str) -> bool:
    return any(metric.endswith(s) for s in LOWER_IS_BETTER)


def _speed(r: dict) -> tuple[str, float, bool] | None:
    """(name, value, higher_is_better) of a record's headline speed figure. An eval record's name carries
    its unit: results written before units were recorded divided all examples by the wall time, newer ones
    divide the units computed in the run by their compute time, and the two are not comparable."""
    cost = r.get("cost") or {}
    if r.get("kind") == "profile":
        median = (cost.get("seconds") or {}).get("median")
        return ("seconds.median", median, False) if median else None
    eps = cost.get("examples_per_second")
    unit = cost.get("examples_unit")
    return (f"examples_per_second [{unit}]" if unit else "examples_per_second", eps, True) if eps else None


def _memory(r: dict) -> tuple[str, float] | None:
    memory = (r.get("cost") or {}).get("memory") or {}
    for key in MEMORY_KEYS:
        if memory.get(key):
            return f"memory.{key}", memory[key]
    return None


def compare(base: dict, new: dict, metric_tol: float = 0.5, speed_tol: float = 0.10, memory_tol: float = 0.05) -> list[Row]:
    base_ok = {record_key(r): r for r in base["records"] if r.get("status") == "ok"}
    new_ok = {record_key(r): r for r in new["records"] if r.get("status") == "ok"}
    rows: list[Row] = []
    for key, b in base_ok.items():
        n = new_ok.get(key)
        if n is None:
            rows.append(Row(key, "record", None, None, "missing in NEW", True))
            continue
        for metric, bv in (b.get("metrics") or {}).items():
            nv = (n.get("metrics") or {}).get(metric)
            if not isinstance(bv, (int, float)) or not isinstance(nv, (int, float)) or bv != bv or nv != nv:
                continue
            delta = nv - bv
            worse = delta > metric_tol if _lower_is_better(metric) else -delta > metric_tol
            rows.append(Row(key, metric, bv, nv, f"{delta:+.3f}", worse))
        bs, ns = _speed(b), _speed(n)
        if b.get("int8_outliers") != n.get("int8_outliers"):  # random-init int8 with and without the outlier path
            rows.append(Row(key, "speed and memory", None, None, f"not comparable: int8_outliers "
                            f"{b.get('int8_outliers') or 'unrecorded'} vs {n.get('int8_outliers') or 'unrecorded'}",
                            False))
            continue
        if bs and ns and bs[0] != ns[0]:
            rows.append(Row(key, f"{bs[0]} vs {ns[0]}", bs[1], ns[1], "not comparable", False))
        elif bs and ns:
            name, bv, higher = bs
            nv = ns[1]
            rel = (nv - bv) / bv
            worse = (-rel if higher else rel) > speed_tol
            rows.append(Row(key, name, bv, nv, f"{rel:+.1%}", worse))
        bm, nm = _memory(b), _memory(n)
        if bm and nm and bm[0] == nm[0]:
            rel = (nm[1] - bm[1]) / bm[1]
            rows.append(Row(key, bm[0], bm[1], nm[1], f"{rel:+.1%}", rel > memory_tol))
        bw, nw = (b.get("cost") or {}).get("weight_bytes"), (n.get("cost") or {}).get("weight_bytes")
        if bw and nw:
            rel = (nw - bw) / bw
            rows.append(Row(key, "weight_bytes", bw, nw, f"{rel:+.1%}", rel > memory_tol))
    return rows


def format_table(rows: list[Row]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    header = ("record", "quantity", "base", "new", "change", "verdict")
    lines = [header] + [(r.key, r.quantity, fmt(r.base), fmt(r.new), r.change, "REGRESSED" if r.regressed else "ok")
                        for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def run_compare(base_path, new_path, metric_tol="0.5", speed_tol="10%", memory_tol="5%") -> tuple[int, str]:
    rows = compare(read_results(base_path), read_results(new_path),
                   metric_tol=parse_tolerance(metric_tol, "metric-tol", percent=False),
                   speed_tol=parse_tolerance(speed_tol, "speed-tol", percent=True),
                   memory_tol=parse_tolerance(memory_tol, "memory-tol", percent=True))
    regressed = sum(r.regressed for r in rows)
    summary = f"{regressed} regression(s) in {len(rows)} comparison(s)" if rows else "nothing to compare"
    return (1 if regressed else 0), format_table(rows) + "\n" + summary
