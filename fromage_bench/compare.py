"""`fromage-bench compare BASE NEW`: deltas between two runs and a verdict for CI.

Metrics (`--rule paired`, the default): each metric's difference NEW - BASE over the examples both runs share
(joined by example id from their `predictions/*.jsonl`), with a paired bootstrap interval (`bootstrap.py`: the
same resampled stories / dialogues / images for both runs). A metric regresses when the whole 95 % interval of
its difference lies below `-metric_tol` points (above `+metric_tol` for a lower-is-better one such as
mean_rank): noise of the size a rerun on other hardware makes (ties broken otherwise, a few examples moving)
is not a regression, a real drop on many examples is. A metric the predictions cannot give per example (corpus
BLEU, METEOR), and every metric of a record whose predictions either run lacks, falls back to the absolute rule
and says so. `--rule absolute`: the old rule, a drop of more than `metric_tol` points.

Speed and memory: compared only between comparable environments (`environment.comparable`: the same CPU
model, stepping and instruction sets, cores, torch threads, GPUs, driver, CUDA, torch / transformers /
bitsandbytes); otherwise each such row is `not comparable` with the reason, not a regression, unless
`compare_speed_anyway`. A record got slower when its speed fell by more than `speed_tol` (relative); its peak
memory or weight bytes grew by more than `memory_tol` (relative). Weight bytes are the model's, compared
always. A record of BASE missing from NEW is a regression too (a task that stopped running).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from model.errors import FromageInputError

from . import bootstrap
from .environment import comparable
from .results import RESULTS_FILE, read_results

LOWER_IS_BETTER = ("mean_rank", "median_rank")
MEMORY_KEYS = ("cuda_max_allocated_bytes", "nvml_process_used_bytes", "cpu_rss_bytes")
RULES = ("paired", "absolute")
OTHER_ENVIRONMENT = "not comparable: other environment"
FORMATS = ("text", "markdown", "json", "junit")


@dataclass
class Row:
    key: str
    quantity: str
    base: float | None
    new: float | None
    change: str
    regressed: bool
    ci95: tuple[float, float] | None = None  # paired rule: the interval of NEW - BASE
    note: str = ""                           # which rule decided, over how many examples; why not comparable

    @property
    def verdict(self) -> str:
        if self.regressed:
            return "REGRESSED"
        return "not comparable" if self.change.startswith("not comparable") else "ok"


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
    model = f"{r['model']} " if r.get("model") else ""  # reproduce's combined files: one record per model
    return f"{model}{r['task']}:{r['setting']} [{r.get('protocol')}] @{r['precision']}"


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


# -- per-example predictions ----------------------------------------------------------------------------
def read_predictions(run_dir: Path | None, record: dict) -> tuple[list[dict] | None, str]:
    """A record's per-example predictions, or (None, why not). A file that exists but is not JSON lines is bad
    input (FromageInputError): a regression check must not quietly fall back on a damaged run."""
    name = record.get("predictions_file")
    if run_dir is None or not name:
        return None, "no predictions_file in the record"
    path = Path(run_dir) / name
    if not path.is_file():
        return None, f"{name} not found"
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise FromageInputError(f"{path}:{number}", f"not a JSON line ({err.msg})") from None
    return out, ""


def _examples(run_dir: Path | None, record: dict, side: str) -> tuple[bootstrap.Examples | None, str]:
    predictions, why = read_predictions(run_dir, record)
    if predictions is None:
        return None, f"{side}: {why}"
    return bootstrap.examples_of(record, predictions), ""


def _absolute_row(key: str, metric: str, bv: float, nv: float, tol: float, note: str) -> Row:
    delta = nv - bv
    worse = delta > tol if _lower_is_better(metric) else -delta > tol
    return Row(key, metric, bv, nv, f"{delta:+.3f}", worse, note=note)


def _paired_row(key: str, metric: str, bv: float, nv: float, diff: bootstrap.Difference, tol: float,
                unit: str, n_base: int, n_new: int) -> Row:
    lo, hi = diff.ci95
    worse = lo > tol if _lower_is_better(metric) else hi < -tol
    units = "stories" if unit == "story" else f"{unit}s"
    shared = f"{diff.shared} {units}" if diff.shared == n_base == n_new else \
        f"{diff.shared} shared {units} of {n_base} / {n_new}"
    return Row(key, metric, bv, nv, f"{diff.delta:+.3f} [{lo:+.3f}, {hi:+.3f}]", worse, (lo, hi),
               f"paired bootstrap over {shared}")


def _metric_rows(key: str, b: dict, n: dict, base_dir, new_dir, rule: str, tol: float) -> list[Row]:
    """One row per metric both records have: the paired rule where both runs' predictions give the metric per
    example, else the absolute rule with the reason."""
    metrics = [m for m in bootstrap.numeric_metrics(b) if m in bootstrap.numeric_metrics(n)]
    if not metrics:
        return []
    diffs: dict[str, bootstrap.Difference] = {}
    fallback = {m: "absolute rule (--rule absolute)" for m in metrics}
    if rule == "paired":
        base_ex, why_base = _examples(base_dir, b, "BASE")
        new_ex, why_new = _examples(new_dir, n, "NEW")
        if base_ex is None or new_ex is None:
            fallback = {m: f"absolute rule: no per-example predictions ({why_base or why_new})" for m in metrics}
        else:
            diffs, shared = bootstrap.paired_differences(base_ex, new_ex)
            units = (bootstrap.cluster_index(base_ex)[1], bootstrap.cluster_index(new_ex)[1])
            for m in metrics:
                reason = base_ex.not_available.get(m) or new_ex.not_available.get(m)
                if shared == 0:
                    reason = f"no {base_ex.unit} in both runs"
                elif m in diffs and diffs[m].ci95 is None:
                    reason = "too few shared examples for an interval"
                if reason or m not in diffs:
                    fallback[m] = f"absolute rule: {reason or 'no per-example value'}"
                else:
                    fallback[m] = ""
    rows = []
    for m in metrics:
        bv, nv = b["metrics"][m], n["metrics"][m]
        if fallback[m]:
            rows.append(_absolute_row(key, m, bv, nv, tol, fallback[m]))
        else:
            rows.append(_paired_row(key, m, bv, nv, diffs[m], tol, base_ex.unit.split(" (")[0], *units))
    return rows


def _cost_rows(key: str, b: dict, n: dict, speed_tol: float, memory_tol: float, speed_comparable: bool) -> list[Row]:
    """Speed, memory and weight-byte rows; `speed_comparable`: the two machines' speed and memory are comparable
    (the reasons they are not are said once, in the report's environment line)."""
    rows: list[Row] = []
    bs, ns = _speed(b), _speed(n)
    if b.get("int8_outliers") != n.get("int8_outliers"):  # random-init int8 with and without the outlier path
        return [Row(key, "speed and memory", None, None, f"not comparable: int8_outliers "
                    f"{b.get('int8_outliers') or 'unrecorded'} vs {n.get('int8_outliers') or 'unrecorded'}", False)]
    bm, nm = _memory(b), _memory(n)
    if bs and ns and bs[0] != ns[0]:
        rows.append(Row(key, f"{bs[0]} vs {ns[0]}", bs[1], ns[1], "not comparable", False))
    elif bs and ns:
        name, bv, higher = bs
        nv = ns[1]
        if not speed_comparable:
            rows.append(Row(key, name, bv, nv, OTHER_ENVIRONMENT, False))
        else:
            rel = (nv - bv) / bv
            rows.append(Row(key, name, bv, nv, f"{rel:+.1%}", (-rel if higher else rel) > speed_tol))
    if bm and nm and bm[0] == nm[0]:
        if not speed_comparable:
            rows.append(Row(key, bm[0], bm[1], nm[1], OTHER_ENVIRONMENT, False))
        else:
            rel = (nm[1] - bm[1]) / bm[1]
            rows.append(Row(key, bm[0], bm[1], nm[1], f"{rel:+.1%}", rel > memory_tol))
    bw, nw = (b.get("cost") or {}).get("weight_bytes"), (n.get("cost") or {}).get("weight_bytes")
    if bw and nw:
        rel = (nw - bw) / bw
        rows.append(Row(key, "weight_bytes", bw, nw, f"{rel:+.1%}", rel > memory_tol))
    return rows


def compare(base: dict, new: dict, metric_tol: float = 0.5, speed_tol: float = 0.10, memory_tol: float = 0.05,
            rule: str = "paired", base_dir: Path | None = None, new_dir: Path | None = None,
            compare_speed_anyway: bool = False) -> list[Row]:
    """Rows of BASE vs NEW. `base_dir` / `new_dir`: the run directories the records' predictions_file paths are
    relative to (None: no predictions, the absolute rule)."""
    if rule not in RULES:
        raise FromageInputError(f"--rule {rule}", "unknown rule", f"valid rules: {', '.join(RULES)}")
    same, reasons = comparable(base.get("environment"), new.get("environment"))
    speed_comparable = same or compare_speed_anyway
    base_ok = {record_key(r): r for r in base["records"] if r.get("status") == "ok"}
    new_ok = {record_key(r): r for r in new["records"] if r.get("status") == "ok"}
    rows: list[Row] = []
    for key, b in base_ok.items():
        n = new_ok.get(key)
        if n is None:
            rows.append(Row(key, "record", None, None, "missing in NEW", True))
            continue
        rows += _metric_rows(key, b, n, base_dir, new_dir, rule, metric_tol)
        rows += _cost_rows(key, b, n, speed_tol, memory_tol, speed_comparable)
    return rows


# -- output -----------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_line(rows: list[Row]) -> str:
    if not rows:
        return "nothing to compare"
    regressed = sum(r.regressed for r in rows)
    apart = sum(r.verdict == "not comparable" for r in rows)
    return f"{regressed} regression(s) in {len(rows)} comparison(s)" + (f", {apart} not comparable" if apart else "")


def _table(rows: list[Row]) -> list[tuple[str, ...]]:
    return [(r.key, r.quantity, _fmt(r.base), _fmt(r.new), r.change, r.verdict, r.note) for r in rows]


HEADER = ("record", "quantity", "base", "new", "change [95% CI]", "verdict", "how")


def format_text(rows: list[Row], environment_note: str) -> str:
    lines = [HEADER] + _table(rows)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(HEADER))]
    table = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    return f"{table}\n{environment_note}\n{summary_line(rows)}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_markdown(rows: list[Row], environment_note: str) -> str:
    """For a GitHub job summary: the verdict, the regressions, then every row folded away."""
    def table(selected):
        out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        out += ["| " + " | ".join(_md_cell(c) for c in line) + " |" for line in _table(selected)]
        return out

    regressed = [r for r in rows if r.regressed]
    verdict = "❌" if regressed else "✅"
    lines = [f"## fromage-bench compare: {verdict} {summary_line(rows)}", "", f"_{_md_cell(environment_note)}_", ""]
    if regressed:
        lines += ["### Regressions", ""] + table(regressed) + [""]
    lines += ["<details><summary>All comparisons</summary>", ""] + table(rows) + ["", "</details>", ""]
    return "\n".join(lines)


def format_json(rows: list[Row], environment: dict, exit_code: int) -> str:
    return json.dumps({"summary": summary_line(rows), "exit_code": exit_code,
                       "regressions": sum(r.regressed for r in rows), "comparisons": len(rows),
                       "environment": environment,
                       "rows": [{**asdict(r), "ci95": list(r.ci95) if r.ci95 else None, "verdict": r.verdict}
                                for r in rows]}, indent=2) + "\n"


def format_junit(rows: list[Row], environment_note: str) -> str:
    """JUnit XML, one test case per record: failed when any of its rows regressed."""
    from xml.etree import ElementTree as ET

    by_record: dict[str, list[Row]] = {}
    for r in rows:
        by_record.setdefault(r.key, []).append(r)
    failures = sum(any(r.regressed for r in group) for group in by_record.values())
    suite = ET.Element("testsuite", name="fromage-bench compare", tests=str(len(by_record)), failures=str(failures),
                       errors="0", skipped="0")
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="environment", value=environment_note)
    for key, group in by_record.items():
        classname, _, name = key.partition(" ")
        case = ET.SubElement(suite, "testcase", classname=classname, name=name or key)
        detail = "\n".join("  ".join(c for c in line if c) for line in _table(group))
        bad = [r for r in group if r.regressed]
        if bad:
            failure = ET.SubElement(case, "failure", message="; ".join(f"{r.quantity} {r.change}" for r in bad),
                                    type="regression")
            failure.text = detail
        ET.SubElement(case, "system-out").text = detail
    root = ET.Element("testsuites", name="fromage-bench compare", tests=suite.get("tests"), failures=str(failures))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _run_dir(path) -> Path:
    path = Path(path)
    return path if path.is_dir() or path.name != RESULTS_FILE else path.parent


def parse_reports(specs: list[str] | None) -> dict[str, Path]:
    """`--report FORMAT=PATH` (repeatable) -> {format: path}."""
    reports: dict[str, Path] = {}
    for spec in specs or []:
        fmt, sep, path = spec.partition("=")
        if not sep or not path or fmt not in FORMATS:
            raise FromageInputError(f"--report {spec}", "expected FORMAT=PATH", f"formats: {', '.join(FORMATS)}")
        reports[fmt] = Path(path)
    return reports


def render(rows: list[Row], fmt: str, code: int, same: bool, reasons: list[str], speed_anyway: bool) -> str:
    if fmt not in FORMATS:
        raise FromageInputError(f"--format {fmt}", "unknown format", f"valid formats: {', '.join(FORMATS)}")
    if same:
        note = "environments comparable: speed and memory compared"
    elif speed_anyway:
        note = "environments differ (" + "; ".join(reasons) + "): speed and memory compared anyway"
    else:
        note = "environments not comparable (" + "; ".join(reasons) + "): speed and memory not compared"
    if fmt == "json":
        return format_json(rows, {"comparable": same, "reasons": reasons, "speed_compared": same or speed_anyway}, code)
    if fmt == "junit":
        return format_junit(rows, note)
    if fmt == "markdown":
        return format_markdown(rows, note)
    return format_text(rows, note) + "\n"


def run_compare(base_path, new_path, metric_tol="0.5", speed_tol="10%", memory_tol="5%", rule: str = "paired",
                output: str = "text", compare_speed_anyway: bool = False,
                reports: dict[str, Path] | None = None) -> tuple[int, str]:
    """(exit code, the report in `output`'s format); `reports`: more formats written to files from the same rows."""
    for fmt in [output, *(reports or {})]:
        render([], fmt, 0, True, [], False)  # an unknown format fails before any work
    base, new = read_results(base_path), read_results(new_path)
    rows = compare(base, new, metric_tol=parse_tolerance(metric_tol, "metric-tol", percent=False),
                   speed_tol=parse_tolerance(speed_tol, "speed-tol", percent=True),
                   memory_tol=parse_tolerance(memory_tol, "memory-tol", percent=True), rule=rule,
                   base_dir=_run_dir(base_path), new_dir=_run_dir(new_path),
                   compare_speed_anyway=compare_speed_anyway)
    code = 1 if any(r.regressed for r in rows) else 0
    same, reasons = comparable(base.get("environment"), new.get("environment"))
    for fmt, path in (reports or {}).items():
        from model.files import atomic_write_text

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, render(rows, fmt, code, same, reasons, compare_speed_anyway))
    return code, render(rows, output, code, same, reasons, compare_speed_anyway)
