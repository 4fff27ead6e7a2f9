"""`write_report`: one self-contained HTML file per run directory (`run_dir/report.html`).

Everything is inline: CSS in a <style>, plots as base64 PNG data URIs, thumbnails as base64 JPEG data URIs.
No JavaScript and no external URL; a Content-Security-Policy meta tag forbids scripts and any non-data
resource, so the file is safe to open from disk. Every string that comes from a dataset, the config or the
environment is HTML-escaped: the markup lives in Jinja2 templates (`templates/report.html.j2`) rendered with
autoescape, and this module only prepares plain data (sections of blocks, tables of rows of cells). Missing or corrupt images become grey placeholders; a section whose data is not
there is left out (or says why), never failing the report.
"""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import jinja2

from fromage_bench.results import atomic_write_text, read_results

from . import plots

REPORT_FILE = "report.html"
PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8")  # highest first
THUMB_PX = 96
MAX_EXAMPLES = 5
TOP_SHOWN = 5
HEADLINE_METRICS = ("R@1", "NDCG", "MRR", "BLEU-4", "BLEU4", "CIDEr", "R@5", "R@10", "accuracy")
HEADLINE_BY_TASK = (("visdial_ranking", ("NDCG", "MRR")), ("caption", ("BLEU-4", "BLEU4", "CIDEr")))
TOP_KEYS = ("top", "topk", "top_k", "top5", "top10", "topk_preds", "top_ids", "retrieved", "predictions")
TARGET_KEYS = ("target", "target_id", "gt", "gt_id", "gt_image", "answer_image")
RANK_KEYS = ("rank", "gt_rank", "target_rank")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

TEMPLATES = Path(__file__).parent / "templates"  # report.html.j2 (the page and its macros), report.css


# ----------------------------------------------------------------------------------------------- helpers

def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_num(v: Any, digits: int = 2) -> str | None:
    """A number with `digits` decimals (thousands separated); anything else as its text, None as None."""
    if _is_num(v):
        return f"{v:,.{digits}f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return None if v is None else str(v)


def fmt_signed(v: Any, digits: int = 2) -> str:
    return f"{v:+.{digits}f}" if _is_num(v) else "\u2014"


def human_bytes(n: Any) -> str:
    if not _is_num(n):
        return "\u2014"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _get(d: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def precision_key(p: Any) -> tuple:
    p = str(p)
    return (PRECISION_ORDER.index(p), "") if p in PRECISION_ORDER else (len(PRECISION_ORDER), p)


def _sign_class(v: Any) -> str:
    if not _is_num(v) or v == 0:
        return ""
    return "pos" if v > 0 else "neg"


def _span(text: Any, cls: str | None = None, title: Any = None) -> dict:
    """A piece of cell content: `text` in a <span> with an optional class and hover title."""
    return {"text": text, "cls": cls, "title": None if title is None else str(title)}


DASH = "\u2014"  # what a missing value shows
BR = {"br": True}  # a line break between pieces of one cell


def _cell(*content: Any, cls: str | None = None, colspan: int | None = None, rowspan: int | None = None,
          title: Any = None, precision: Any = None) -> dict:
    """A table cell (<td>/<th>): its pieces (plain text, `_span`s, `BR`) and attributes; None text shows as —."""
    return {"content": [c if isinstance(c, dict) else _text(c) for c in content], "cls": cls, "colspan": colspan, "rowspan": rowspan, "title": None if title is None else str(title),
            "precision": None if precision is None else str(precision)}


def _row(cells: list[dict], cls: str | None = None) -> dict:
    return {"cells": cells, "cls": cls}


def _table(headers: Iterable[str], rows: list[dict], table_id: str | None = None,
           head: list[list[dict]] | None = None) -> dict:
    return {"kind": "table", "id": table_id, "rows": rows,
            "head": head if head is not None else [[_cell(h) for h in headers]]}


def _text(value: Any) -> str:
    return DASH if value is None else str(value)


def _section(anchor: str, title: str, *blocks: dict, nav: str | None = None) -> dict:
    return {"anchor": anchor, "title": title, "nav": nav or title, "blocks": [b for b in blocks if b]}


def _note(text: str) -> dict:
    return {"kind": "note", "text": text}


def _muted(text: str) -> dict:
    return {"kind": "muted", "text": text}


# ---------------------------------------------------------------------------------------------- records

class Run:
    """results.json, indexed for the report."""

    def __init__(self, document: dict, run_dir: Path):
        self.doc = document
        self.run_dir = run_dir
        records = [r for r in document.get("records") or [] if isinstance(r, dict)]
        self.evals = [r for r in records if r.get("kind", "eval") == "eval"]
        self.profiles = [r for r in records if r.get("kind") == "profile"]
        self.records = records
        self.ok_evals = [r for r in self.evals if r.get("status", "ok") == "ok"]
        self.precisions = sorted({str(r.get("precision")) for r in records if r.get("precision") is not None},
                                 key=precision_key)
        self.ok_precisions = sorted({str(r.get("precision")) for r in self.ok_evals}, key=precision_key)
        from fromage_bench.reproduce import models_of, paper_data

        self.models = models_of(document)          # one model (eval) or several (reproduce)
        self.paper_data = paper_data(document)      # (the data is the paper's, why)
        self.several_models = len(self.models) > 1

    def model_of(self, record: dict) -> str | None:
        """The record's model label where the run has several models (reproduce), else None."""
        return str(record.get("model")) if self.several_models and record.get("model") is not None else None

    def where(self, record: dict, *parts: Any) -> str:
        """A task label (`_label` of parts), led by the record's model where the run has several."""
        model = self.model_of(record)
        return f"{model} {_label(*parts)}" if model else _label(*parts)

    def task_settings(self) -> list[tuple[str, Any]]:
        seen: dict[tuple[str, Any], None] = {}
        for r in self.evals:
            seen.setdefault((str(r.get("task")), r.get("setting")), None)
        return list(seen)

    def cells(self) -> list[tuple[str | None, str, Any]]:
        """(model where the run has several, task, setting) of every eval record, in order."""
        seen: dict[tuple, None] = {}
        for r in self.evals:
            seen.setdefault((self.model_of(r), str(r.get("task")), r.get("setting")), None)
        return list(seen)

    def skipped_for(self, task: str, setting: Any, protocol: Any, precision: str,
                    model: str | None = None) -> dict | None:
        """A skipped record covering this cell: same key, or the same task(/setting) with no protocol (of `model`
        where the run has several)."""
        for r in self.evals:
            if r.get("status", "ok") == "ok" or str(r.get("task")) != task or str(r.get("precision")) != precision:
                continue
            if self.model_of(r) != model:
                continue
            if r.get("setting") not in (setting, None):
                continue
            if r.get("protocol") in (protocol, None):
                return r
        return None


def _label(task: Any, setting: Any = None, protocol: Any = None) -> str:
    return ":".join(str(x) for x in (task, setting, protocol) if x not in (None, ""))


def _peak_memory(mem: Any) -> tuple[str, float] | None:
    """The most telling peak of a `cost.memory` dict: CUDA allocated, else NVML process/device, else RSS."""
    if not isinstance(mem, dict):
        return None
    for key, name in (("cuda_max_allocated_bytes", "CUDA allocated"), ("nvml_process_used_bytes", "NVML process"),
                      ("nvml_device_used_bytes", "NVML device"), ("cpu_rss_bytes", "RSS")):
        if _is_num(mem.get(key)):
            return name, float(mem[key])
    return None


def _tokens_per_second(throughput: Any) -> tuple[float | None, str]:
    """Tokens the model computed per second (scored, encoded, generated), and a breakdown that also shows the
    generated tokens kept (up to each answer's stop), which are a part of the computed ones, not more work."""
    if not isinstance(throughput, dict):
        return None, ""
    parts = {k: v for k, v in throughput.items() if k.startswith("tokens") and k.endswith("_per_second") and _is_num(v)}
    if not parts:
        return None, ""
    breakdown = ", ".join(f"{k.removesuffix('_per_second')}: {v:.1f}/s" for k, v in sorted(parts.items()))
    return float(sum(v for k, v in parts.items() if not k.endswith("_kept_per_second"))), breakdown


def _latency(cost: dict) -> tuple[dict, str, float | None]:
    """(percentiles in ms, what they are per, warm-up batch ms) of a cell: the headline step's steady-state
    ms per unit in new results, the old files' ms per example (each batch's time split evenly) otherwise."""
    latency = cost.get("latency")
    if isinstance(latency, dict) and isinstance(latency.get("steps"), dict):
        step = latency["steps"].get(latency.get("headline")) or {}
        steady = step.get("steady") if isinstance(step.get("steady"), dict) else {}
        per_unit = steady.get("per_unit_ms") if isinstance(steady.get("per_unit_ms"), dict) else {}
        warmup = _get(step, "warmup", "batch_ms")
        return per_unit, f"ms per {step.get('unit', 'unit')}, steady state", warmup if _is_num(warmup) else None
    old = cost.get("latency_ms") if isinstance(cost.get("latency_ms"), dict) else {}
    return old, "ms per example (older results: batch time split evenly, warm-up included)", None


def _examples_rate(cost: dict) -> list:
    """Examples/s with its unit, or why there is none (every batch resumed): cell pieces."""
    rate, unit = cost.get("examples_per_second"), cost.get("examples_unit")
    if _is_num(rate):
        return [_span(fmt_num(rate), title=f"{unit or 'examples'} per second")] + (
            [" ", _span(unit, "muted")] if unit else [])
    step = _get(cost, "latency", "steps", _get(cost, "latency", "headline")) or {}
    if isinstance(step, dict) and step.get("batches_computed") == 0 and step.get("batches_resumed"):
        return [_span("all resumed", title=DASH if cost.get("examples_per_second_note") is None
                      else cost.get("examples_per_second_note"))]
    return [DASH]


def _images_per_second(throughput: Any) -> float | None:
    if not isinstance(throughput, dict):
        return None
    if _is_num(throughput.get("images_encoded_per_second")):
        return float(throughput["images_encoded_per_second"])
    vals = [v for k, v in throughput.items() if k.startswith("images") and k.endswith("_per_second") and _is_num(v)]
    return float(sum(vals)) if vals else None


def headline_metric(metrics: dict, task: str = "") -> str | None:
    """The metric that stands for a task in the accuracy-vs-memory plot (NDCG for VisDial, R@1 for retrieval,
    BLEU-4 for captioning, ...), else its first numeric metric."""
    numeric = [k for k, v in metrics.items() if _is_num(v)]
    lowered = {k.lower(): k for k in numeric}
    preferred = next((names for part, names in HEADLINE_BY_TASK if part in task.lower()), ())
    for want in (*preferred, *HEADLINE_METRICS):
        if want.lower() in lowered:
            return lowered[want.lower()]
    return numeric[0] if numeric else None


# ---------------------------------------------------------------------------------------------- sections

def _summary(run: Run) -> dict:
    doc, config, env = run.doc, run.doc.get("config") or {}, run.doc.get("environment") or {}
    model = config.get("model_dir") if isinstance(config, dict) else None
    if isinstance(config, dict) and config.get("random_init"):
        model = (f"random init ({config.get('opt_version') or 'default LM'}, "
                 f"{config.get('visual_model') or 'default vision'})")
    elif isinstance(config, dict):
        extras = [str(config[k]) for k in ("opt_version", "visual_model") if config.get(k)]
        if extras:
            model = f"{model or 'model'} ({', '.join(extras)})"
    gpus = [g.get("name") for g in env.get("gpus") or [] if isinstance(g, dict) and g.get("name")]
    hardware = ", ".join(gpus) if gpus else (env.get("cpu") or None)
    device = (config.get("device") if isinstance(config, dict) else None) or "auto"
    precisions = []
    for p in run.precisions:
        ok = any(str(r.get("precision")) == p and r.get("status", "ok") == "ok" for r in run.records)
        precisions.append(p if ok else f"{p} (skipped)")
    code = env.get("code") if isinstance(env.get("code"), dict) else {}
    commit = code.get("commit")
    if commit and code.get("dirty"):
        commit = f"{commit} (dirty)"
    if run.several_models or run.doc.get("model"):
        model = "; ".join(f"{label}: {m.get('family')} ({m.get('source')})" for label, m in run.models.items())
    items = [
        ("model" if len(run.models) == 1 else "models", model),
        ("data", ("the paper's" if run.paper_data[0] else "not the paper's") + f" ({run.paper_data[1]})"),
        ("device", f"{device} \u2014 {hardware}" if hardware else device),
        ("precisions", ", ".join(precisions) or None),
        ("tasks", ", ".join(_label(t, s) for t, s in run.task_settings()) or None),
        ("records", f"{len(run.records)} ({len(run.evals)} eval, {len(run.profiles)} profile)"),
        ("created", doc.get("created")), ("commit", commit),
        ("schema", f"{doc.get('schema')} v{doc.get('schema_version')}"),
    ]
    return _section("summary", "Summary", {"kind": "kv", "pairs": items})


def _value_pieces(rec: dict, metric: str) -> list:
    """A metric's value, with `± stderr` where the record has a bootstrap standard error for it."""
    value = (rec.get("metrics") or {}).get(metric)
    stderr = _get(rec, "uncertainty", "stderr", metric)
    pieces: list = [_text(fmt_num(value))]
    if _is_num(stderr):
        ci = _get(rec, "uncertainty", "ci95", metric)
        title = f"bootstrap standard error ({_get(rec, 'uncertainty', 'resamples')} resamples)" + (
            f"; 95% interval {fmt_num(ci[0])} to {fmt_num(ci[1])}" if isinstance(ci, list) and len(ci) == 2
            and all(_is_num(x) for x in ci) else "")
        pieces.append(_span(f" \u00b1 {fmt_num(stderr)}", "stderr", title=title))
    return pieces


def _accuracy(run: Run) -> dict:
    """Every metric of every cell, folded: on the paper's data with its difference to the paper, on other data
    with the metric's chance level instead (a difference to the paper would mean nothing there)."""
    if not run.evals:
        return _section("accuracy", "Accuracy", _note("No evaluation records in this run."))
    paper_data = run.paper_data[0]
    precisions = sorted({str(r.get("precision")) for r in run.evals}, key=precision_key)
    reference = run.ok_precisions[0] if run.ok_precisions else None
    # Row groups: (model, task, setting, protocol) of every ok record, in order; cells with none ok get one row.
    keys: dict[tuple, None] = {}
    for r in run.ok_evals:
        keys.setdefault((run.model_of(r), str(r.get("task")), r.get("setting"), r.get("protocol")), None)
    for r in run.evals:
        model, task, setting = run.model_of(r), str(r.get("task")), r.get("setting")
        if not any(k[:3] == (model, task, setting) for k in keys):
            keys.setdefault((model, task, setting, None), None)
    by_cell = {(run.model_of(r), str(r.get("task")), r.get("setting"), r.get("protocol"), str(r.get("precision"))): r
               for r in run.ok_evals}
    second = "\u0394 paper" if paper_data else "chance"
    lead = (["Model"] if run.several_models else []) + ["Task", "Setting", "Protocol", "Metric", "Paper"]
    head = [[_cell(h, rowspan=2) for h in lead] + [_cell(p, colspan=3, precision=p) for p in precisions],
            [_cell(h) for _ in precisions for h in ("ours", second, "drift")]]
    rows = []
    for model, task, setting, protocol in keys:
        cells = {p: by_cell.get((model, task, setting, protocol, p)) for p in precisions}
        paper = next((c.get("paper") for c in cells.values() if c and isinstance(c.get("paper"), dict)), None) or {}
        metrics: dict[str, None] = {}
        for c in cells.values():
            if c and isinstance(c.get("metrics"), dict):
                for m in c["metrics"]:
                    metrics.setdefault(str(m), None)
        for m in paper:
            metrics.setdefault(str(m), None)
        base = cells.get(reference) if reference else None
        for i, metric in enumerate(metrics or [None]):
            tds = ([_cell(model)] if run.several_models else []) + [
                _cell(task), _cell(setting), _cell(protocol), _cell(metric),
                _cell(fmt_num(paper.get(metric)) if metric in paper else DASH, cls="num paper")]
            for p in precisions:
                rec = cells[p]
                if rec is None:
                    skipped = run.skipped_for(task, setting, protocol, p, model)
                    reason = skipped.get("reason") if skipped else None
                    text = f"skipped: {reason}" if skipped else "not run"
                    tds.append(_cell(text, colspan=3, cls="skipped", precision=p))
                    continue
                value = (rec.get("metrics") or {}).get(metric) if metric is not None else None
                if p == reference:
                    drift_piece = _span("ref", "ref")
                else:
                    drift = _get(rec, "drift", metric)
                    if not _is_num(drift) and base is not None:
                        ref_value = (base.get("metrics") or {}).get(metric)
                        drift = value - ref_value if _is_num(value) and _is_num(ref_value) else None
                    drift_piece = _span(fmt_signed(drift), _sign_class(drift))
                title = f"n={rec.get('n_examples')}, skipped examples={rec.get('n_skipped', 0)}"
                tds.append(_cell(*(_value_pieces(rec, metric) if metric is not None else [DASH]), cls="num value",
                                 precision=p, title=title))
                if paper_data:
                    delta = value - paper[metric] if _is_num(value) and _is_num(paper.get(metric)) else None
                    tds.append(_cell(fmt_signed(delta), cls=f"num delta {_sign_class(delta)}", precision=p))
                else:
                    level = _get(rec, "chance", metric) if metric is not None else None
                    tds.append(_cell(fmt_num(level) if _is_num(level) else DASH, cls="num chance", precision=p,
                                     title="a random ranking of the same candidates"))
                tds.append(_cell(drift_piece, cls="num drift", precision=p))
            rows.append(_row(tds, "group-start" if i == 0 else None))
    compared = ("\u0394 paper = ours \u2212 paper." if paper_data else
                f"Data not the paper's ({run.paper_data[1]}): chance = the metric for a random ranking of the same "
                "candidates, in place of a difference to the paper.")
    note = (_muted(f"{compared} Drift = this precision \u2212 {reference} (the highest precision that ran). "
                   "\u00b1: bootstrap standard error.") if reference else None)
    table = _table([], rows, "accuracy-table", head)
    return _section("accuracy", "Every metric", _folded(f"every metric of every cell ({len(rows)} rows)", table, note),
                    nav="Every metric")


def _folded(summary: str, *blocks: dict | None) -> dict:
    """Blocks inside a closed <details> with its summary line."""
    return {"kind": "details", "summary": summary, "blocks": [b for b in blocks if b]}


# -- the paper's tables ----------------------------------------------------------------------------------------

def _paper_tables(run: Run) -> dict | None:
    """The report's first section: Tables 1 and 2 in the paper's layout (`fromage_bench.reproduce.paper_tables`,
    the rows tables.md has), ours under each protocol beside the paper's; the difference to the paper under the
    paper protocol on the paper's data, chance rows (and no difference) on other data."""
    from fromage_bench.reproduce import COLUMN_HEADS, COLUMNS, LEGEND, data_sentence, paper_tables

    tables = paper_tables(run.doc)
    if not tables:
        return None
    paper_data = run.paper_data[0]
    blocks: list[dict] = [_note(data_sentence(run.paper_data))]
    for table in tables:
        metrics = table.spec.metrics
        head = [[_cell("Model", rowspan=2), _cell("Setting", rowspan=2)] + [_cell(m, colspan=len(COLUMNS))
                                                                          for m in metrics]
                + [_cell("Note", rowspan=2)],
                [_cell(COLUMN_HEADS[c]) for _ in metrics for c in COLUMNS]]
        rows, last_setting = [], None
        for row in table.rows:
            tds = [_cell(row.model, title=f"{row.label} at {row.precision}" if row.label else None), _cell(row.setting)]
            for metric in metrics:
                for column in COLUMNS:
                    tds.append(_table_cell(row.cells[(metric, column)], column,
                                           row.cells[(metric, "reported")].value if paper_data else None))
            skips = sorted({c.skipped for c in row.cells.values() if c.skipped is not None})
            tds.append(_cell(row.note or "; ".join(f"skipped: {r}" for r in skips) or None, cls="muted"))
            cls = " ".join(c for c in ("group-start" if row.setting != last_setting else "",
                                        "chance" if row.kind == "chance" else "") if c) or None
            rows.append(_row(tds, cls))
            last_setting = row.setting
        blocks += [{"kind": "h3", "text": table.spec.title, "where": None},
                   _table([], rows, f"paper-{table.spec.key}", head)]
    blocks.append(_muted(LEGEND + ". Numbers in percent; \u00b1 one bootstrap standard error where the run has one"
                         + ("; under (p), the difference to the paper." if paper_data else ".")))
    return _section("tables", "The paper's tables", *blocks, nav="Paper tables")


def _table_cell(cell, column: str, paper_value: float | None) -> dict:
    """One cell of a paper table: ours (± stderr), skipped with its reason, or the paper's number; on the paper's
    data the paper-protocol cell also shows its difference to the paper."""
    if cell.skipped is not None:
        return _cell("skipped", cls="skipped", title=cell.skipped)
    if column == "reported":
        return _cell(fmt_num(cell.value) if cell.value is not None else DASH, cls="num paper")
    pieces: list = [fmt_num(cell.value) if cell.value is not None else DASH]
    if cell.stderr is not None:
        pieces.append(_span(f" \u00b1 {fmt_num(cell.stderr)}", "stderr", title="bootstrap standard error"))
    if column == "paper" and paper_value is not None and cell.value is not None:
        delta = cell.value - paper_value
        pieces += [BR, _span(fmt_signed(delta), _sign_class(delta), title="ours \u2212 paper")]
    return _cell(*pieces, cls="num value")


MEMORY_COLUMNS = (("cuda_max_allocated_bytes", "CUDA alloc"), ("cuda_max_reserved_bytes", "CUDA reserved"),
                  ("nvml_process_used_bytes", "NVML process"), ("nvml_device_used_bytes", "NVML device"),
                  ("cpu_rss_bytes", "RSS"))
# the peak to read, by what the run measured, and the baseline (`cost.memory.baseline`) that goes with it
HEADLINE_MEMORY = (("cuda_max_allocated_bytes", "cuda_allocated_bytes"), ("cpu_rss_bytes", "cpu_rss_bytes"))
MEMORY_UNAVAILABLE = {"nvml_process_used_bytes": ("nvml_process_unavailable", "nvml_unavailable"),
                      "nvml_device_used_bytes": ("nvml_device_unavailable", "nvml_unavailable")}


def _memory_headers(rows_src: list[dict]) -> tuple[list[tuple[str, str]], str | None, list[str]]:
    """The memory columns present in the rows, the one to read (CUDA allocated on a GPU, else RSS), and the
    headers: the one to read says so; "Before cell" is its baseline where the results have one."""
    mem_cols = [(k, name) for k, name in MEMORY_COLUMNS
                if any(_is_num(_get(r, "cost", "memory", k)) or
                       any(_get(r, "cost", "memory", n) for n in MEMORY_UNAVAILABLE.get(k, ())) for r in rows_src)]
    present = {k for k, _ in mem_cols}
    headline = next((k for k, _ in HEADLINE_MEMORY if k in present), None)
    headers = [f"Peak {n} (read this)" if k == headline else f"Peak {n}" for k, n in mem_cols]
    if any(isinstance(_get(r, "cost", "memory", "baseline"), dict) for r in rows_src):
        headers.append("Before cell")
    return mem_cols, headline, headers


def _memory_cells(memory: Any, mem_cols: list[tuple[str, str]], headline: str | None, with_baseline: bool) -> list:
    """One cell per memory column; a figure NVML could not give shows "n/a" with the reason on hover."""
    memory = memory if isinstance(memory, dict) else {}
    cells = []
    for key, _ in mem_cols:
        reason = next((memory[n] for n in MEMORY_UNAVAILABLE.get(key, ()) if memory.get(n)), None)
        if not _is_num(memory.get(key)) and reason:
            cells.append(_span("n/a", "muted", title=reason))
        else:
            cells.append(human_bytes(memory.get(key)))
    if with_baseline:
        base_key = dict(HEADLINE_MEMORY).get(headline)
        cells.append(human_bytes(_get(memory, "baseline", base_key)) if base_key else DASH)
    return cells


def _cost_rows(run: Run) -> list[dict]:
    """One row per task x setting x precision (the protocols of one run share their cost)."""
    seen: dict[tuple, dict] = {}
    for r in run.evals:
        key = (str(r.get("task")), r.get("setting"), str(r.get("precision")), run.model_of(r))
        if r.get("status", "ok") != "ok":
            if not any(k[0] == key[0] and k[2:] == key[2:] for k in seen):
                seen.setdefault(key, r)
            continue
        if key not in seen or seen[key].get("status", "ok") != "ok":
            seen[key] = r
    return sorted(seen.values(), key=lambda r: (precision_key(r.get("precision")), str(run.model_of(r) or ""),
                                                str(r.get("task")), str(r.get("setting"))))


def emulated_precisions(environment: Any) -> dict[str, str]:
    """{precision: note} for the CPU precisions a CPU-only run computed without native arithmetic
    (`environment.cpu_low_precision`, `fromage_bench.cpu_precision`): their speed is the emulation's."""
    if not isinstance(environment, dict) or environment.get("gpus"):
        return {}
    support = environment.get("cpu_low_precision")
    support = support if isinstance(support, dict) else {}
    return {str(p): str(info.get("note", "")) for p, info in support.items()
            if isinstance(info, dict) and info.get("native") is False}


def _cost(run: Run) -> dict | None:
    rows_src = _cost_rows(run)
    if not rows_src:
        return None
    emulated = emulated_precisions(run.doc.get("environment"))
    mem_cols, headline, mem_headers = _memory_headers(rows_src)
    with_baseline = "Before cell" in mem_headers
    headers = (["Precision", "Task", "Load s", "Weights", "Load peak"] + mem_headers
               + ["Examples/s", "Tokens/s", "Images/s", "p50 ms", "p90 ms", "p99 ms", "Warm-up ms"])
    rows = []
    last_precision = None
    for r in rows_src:
        p = str(r.get("precision"))
        cls = "group-start" if p != last_precision else None
        last_precision = p
        label = run.where(r, r.get("task"), r.get("setting"))
        precision_cell = (_cell(p, _span(" (emulated)", "emulated", title=emulated[p])) if p in emulated
                          else _cell(p))
        if r.get("status", "ok") != "ok":
            rows.append(_row([precision_cell, _cell(label),
                              _cell("skipped: " + str(r.get("reason")), colspan=len(headers) - 2, cls="skipped")], cls))
            continue
        cost = r.get("cost") if isinstance(r.get("cost"), dict) else {}
        load_peak = _peak_memory(cost.get("load_memory"))
        tok, breakdown = _tokens_per_second(cost.get("compute_throughput") or cost.get("throughput"))
        lat, lat_label, warmup = _latency(cost)
        images = _images_per_second(cost.get("throughput"))
        num = [fmt_num(cost.get("load_seconds")), human_bytes(cost.get("weight_bytes")),
               _span(human_bytes(load_peak[1]), title=load_peak[0]) if load_peak else DASH]
        num += _memory_cells(cost.get("memory"), mem_cols, headline, with_baseline)
        num += [_examples_rate(cost), _span(fmt_num(tok, 1), title=breakdown) if tok is not None else DASH,
                fmt_num(images, 1) if images is not None else DASH]
        num += [_span(fmt_num(lat.get(q)), title=lat_label) if _is_num(lat.get(q)) else DASH
                for q in ("p50", "p90", "p99")]
        num.append(fmt_num(warmup) if warmup is not None else DASH)
        rows.append(_row([precision_cell, _cell(label)]
                         + [_cell(*(t if isinstance(t, list) else [t]), cls="num") for t in num], cls))
    reset = ("from a reset allocator: each cell's own, not the process's high-water mark" if with_baseline else
             "recorded before per-cell resets: reserved and NVML peaks are the process's high-water marks")
    note = _muted(f"Peak memory during the task, {reset}. Read the column marked "
            "\u201cread this\u201d: on a GPU, CUDA allocated, the most the cell's tensors held at once, model "
            "weights included; \u201cBefore cell\u201d is what was already allocated when it began (the "
            "weights). CUDA reserved adds the allocator's cached free blocks (what must be free on the GPU); NVML "
            "process adds the CUDA context and is what nvidia-smi shows for this process; NVML device counts "
            "every process on the GPU; n/a: NVML could not say (hover for why). On CPU, read RSS. \"Load peak\" "
            "is the peak during the model load (CUDA allocated, else NVML, else process RSS). Examples/s: the "
            "units the task times (dialogue, round, story, caption, image) computed in this run over their compute "
            "time (warm-up batch included; batches resumed from a journal are not counted). Tokens/s sums the "
            "tokens computed (scored, encoded, generated) over the compute time (hover for the breakdown, with the "
            "generated tokens kept). p50/p90/p99: steady-state ms per unit (each unit of a batch gets the batch's "
            "time divided by its size; hover to see which); Warm-up ms: the first batch computed, timed apart.")
    blocks = [_note(f"{p} on this CPU: {text}.") for p, text in emulated.items()]
    return _section("cost", "Cost", *blocks, _table(headers, rows, "cost-table"), note)


def _target_text(target: dict) -> str:
    from fromage_bench.profiler import target_text

    try:
        return target_text(target)
    except (KeyError, TypeError):  # a results file from another version: its verdict only
        return f"target met: {target.get('met')}"


def _profile(run: Run) -> dict | None:
    if not run.profiles:
        return None
    headers = ["Scenario", "Params", "Precision", "Median ms", "Throughput", "Roofline / projection", "Peak memory",
               "Weights"]
    records = sorted(run.profiles, key=lambda r: (str(r.get("scenario")), json.dumps(r.get("params"), sort_keys=True,
                                                                                       default=str),
                                                  precision_key(r.get("precision"))))
    rows = []
    for r in records:
        params = r.get("params") if isinstance(r.get("params"), dict) else {}
        params_text = ", ".join(f"{k}={v}" for k, v in sorted(params.items(), key=lambda kv: str(kv[0])))
        head = [_cell(r.get("scenario")), _cell(params_text), _cell(r.get("precision"))]
        if r.get("status", "ok") != "ok":
            status = f'{r.get("status", "skipped")}: {r.get("reason")}'  # "skipped" or "error" (the path failed)
            rows.append(_row(head + [_cell(status, colspan=5, cls="skipped")]))
            continue
        cost = r.get("cost") if isinstance(r.get("cost"), dict) else {}
        median = _get(cost, "seconds", "median")
        rates = [f"{fmt_num(v, 1)} {k.removesuffix('_per_second')}/s" for k, v in sorted(cost.items())
                 if k.endswith("_per_second") and _is_num(v)]
        roof = r.get("roofline") if isinstance(r.get("roofline"), dict) else None
        if roof and _is_num(roof.get("fraction_of_roofline")):
            roof_pieces = [f'{roof["fraction_of_roofline"] * 100:.1f}% ',
                         _span(f'of {fmt_num(roof.get("roofline_tokens_per_second"), 1)} tok/s', "muted")]
        elif roof and roof.get("roofline_unavailable"):  # MIG, or a device of unknown bandwidth: said, not dropped
            roof_pieces = [_span(f'no roofline: {roof["roofline_unavailable"]}', "muted")]
        else:
            roof_pieces = [DASH]
        projected = _get(r, "projection", "projected_minutes")
        if _is_num(projected):  # one VisDial round timed: the full val set projected from it
            roof_pieces = [f"{fmt_num(projected, 1)} min ",
                         _span(f'VisDial val ({fmt_num(_get(r, "projection", "visdial_val_rounds"), 0)} rounds)',
                               "muted")]
            target = _get(r, "projection", "target")
            if isinstance(target, dict):
                roof_pieces += [BR, _span(_target_text(target), "muted")]
        peak = _peak_memory(cost.get("memory"))
        rate_pieces = [x for rate in rates for x in (BR, rate)][1:] or [DASH]
        rows.append(_row(head + [_cell(fmt_num(median * 1000) if _is_num(median) else DASH, cls="num"),
                                 _cell(*rate_pieces, cls="num"), _cell(*roof_pieces, cls="num"),
                                 _cell(human_bytes(peak[1]) if peak else DASH, cls="num"),
                                 _cell(human_bytes(cost.get("weight_bytes")), cls="num")]))
    note = _muted("Roofline (decode): batch-1 decode reads every weight once per token, so memory "
            "bandwidth / weight bytes bounds tokens/s; the fraction is measured / bound. Projection (option "
            "scoring, 100 options): the median time of one round times the rounds of VisDial val, with every "
            "round's context encoded anew (an upper bound: the task reuses the previous round's prefix).")
    return _section("profile", "Profile", _table(headers, rows, "profile-table"), note)


def _plots(run: Run) -> dict | None:
    precisions = run.ok_precisions
    figures: list[tuple[str, str | None]] = []
    ok_costs = [r for r in run.ok_evals if isinstance(r.get("cost"), dict)]

    def attempt(title: str, fn) -> None:
        try:
            figures.append((title, fn()))
        except Exception as err:  # a plot must never cost the whole report
            figures.append((title, f"error: {type(err).__name__}: {err}"))

    def memory():
        series: dict[str, list] = {"weights": []}
        for k, name in MEMORY_COLUMNS:
            series[name] = []
        for p in precisions:
            recs = [r for r in ok_costs if str(r.get("precision")) == p]
            weights = [r["cost"]["weight_bytes"] for r in recs if _is_num(r["cost"].get("weight_bytes"))]
            series["weights"].append(max(weights) if weights else None)
            for k, name in MEMORY_COLUMNS:
                vals = [_get(r, "cost", "memory", k) for r in recs]
                vals = [v for v in vals if _is_num(v)]
                series[name].append(max(vals) if vals else None)
        return plots.memory_by_precision(precisions, series)

    def throughput():
        series: dict[str, list] = {}
        for model, task, setting in run.cells():
            recs = {str(r.get("precision")): r for r in ok_costs
                    if str(r.get("task")) == task and r.get("setting") == setting and run.model_of(r) == model}
            label = f"{model} {_label(task, setting)}" if model else _label(task, setting)
            series[label] = [_get(recs.get(p), "cost", "examples_per_second") for p in precisions]
        series = {k: [v if _is_num(v) else None for v in vs] for k, vs in series.items()}
        return plots.throughput_by_precision(precisions, series)

    def accuracy_memory():
        panels: dict[str, dict[str, list]] = {}
        names: dict[str, str] = {}
        for r in ok_costs:
            metrics = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
            task = str(r.get("task"))
            metric = names.get(task) or headline_metric(metrics, task)
            peak = _peak_memory(_get(r, "cost", "memory"))
            if metric is None or peak is None or not _is_num(metrics.get(metric)):
                continue
            names[task] = metric
            series = " ".join(str(x) for x in (run.model_of(r), r.get("setting"), r.get("protocol")) if x)
            panels.setdefault(task, {}).setdefault(series or task, []).append(
                (str(r.get("precision")), peak[1], float(metrics[metric])))
        return plots.accuracy_vs_memory(panels, names)

    def latency():
        panels: dict[str, dict] = {}
        for model, task, setting in run.cells():
            by_p = {}
            for p in precisions:
                rec = next((r for r in ok_costs if str(r.get("task")) == task and r.get("setting") == setting
                            and run.model_of(r) == model and str(r.get("precision")) == p
                            and _latency(r["cost"])[0]), None)
                if rec is not None:
                    by_p[p] = _latency(rec["cost"])[0]
            panels[f"{model} {_label(task, setting)}" if model else _label(task, setting)] = by_p
        return plots.latency_by_precision(panels)

    if ok_costs:
        attempt("Memory by precision", memory)
        attempt("Throughput by precision", throughput)
        attempt("Accuracy vs memory", accuracy_memory)
        attempt("Latency distribution", latency)
    parts = []
    for title, uri in figures:
        if uri is None:
            continue
        if uri.startswith("data:"):
            parts.append({"kind": "figure", "uri": uri, "title": title})
        else:
            parts.append(_note(f"{title}: could not be drawn ({uri})"))
    if not parts:
        return None
    return _section("plots", "Plots", *parts)


# ------------------------------------------------------------------------------------- qualitative examples

class Thumbnails:
    """Small JPEG data URIs for dataset images, found through `image_roots` (task -> directory)."""

    def __init__(self, image_roots: dict[str, Path] | None):
        self.roots = {str(k): Path(v) for k, v in (image_roots or {}).items() if v is not None}
        self._cache: dict[tuple[str, str], str | None] = {}

    def root_for(self, task: str, setting: Any = None) -> Path | None:
        return self.roots.get(_label(task, setting)) or self.roots.get(task)

    def find(self, root: Path | None, ident: str) -> Path | None:
        if root is None or not ident:
            return None
        try:
            base = root.resolve()
            for name in (f"{ident}.jpg", f"{ident}.png", f"{ident}.jpeg", f"{ident}.JPG", f"{ident}.PNG", ident):
                candidate = (root / name).resolve()
                if base in candidate.parents and candidate.is_file():
                    return candidate
        except (OSError, ValueError):
            return None
        return None

    def data_uri(self, root: Path | None, ident: str) -> str | None:
        key = (str(root), ident)
        if key not in self._cache:
            self._cache[key] = self._make(self.find(root, ident))
        return self._cache[key]

    @staticmethod
    def _make(path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            from PIL import Image

            with Image.open(path) as img:
                img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
                img = img.convert("RGB")
                img.thumbnail((THUMB_PX, THUMB_PX))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=80)
            return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        except Exception:  # missing, truncated, not an image, too large: a placeholder instead
            return None

    def thumb(self, root: Path | None, ident: Any, hit: bool = False, caption: str | None = None) -> dict:
        """One thumbnail for the template's `thumb` macro: the image's data URI, or None for a placeholder."""
        ident_s = "" if ident is None else str(ident)
        return {"uri": self.data_uri(root, ident_s), "ident": ident_s, "hit": hit, "caption": caption}


def _first(example: dict, keys: Iterable[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in example and example[k] is not None:
            return k, example[k]
    return None, None


def _id_of(item: Any) -> Any:
    if isinstance(item, dict):
        return _first(item, ("id", "image", "photo_id", "image_id", "index"))[1]
    return item


def _top_list(example: dict) -> list | None:
    _, value = _first(example, TOP_KEYS)
    if isinstance(value, (list, tuple)) and value:
        return list(value)
    return None


def _read_examples(path: Path, limit: int = 400) -> Iterator[dict]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if i >= limit:
                break
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj


def _as_text_list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)] if value is not None else []


def _rank_text(example: dict) -> str:
    _, rank = _first(example, RANK_KEYS)
    return f"rank {rank}" if rank is not None else ""


def _render_retrieval(ex: dict, thumbs: Thumbnails, root: Path | None) -> dict | None:
    top = _top_list(ex)
    _, target = _first(ex, TARGET_KEYS)
    if top is None or target is None:
        return None
    title_key, title = _first(ex, ("story_id", "id", "image", "caption_id"))
    captions = _as_text_list(_first(ex, ("captions", "caption", "text", "query"))[1])
    context = _as_text_list(_first(ex, ("context_images", "context", "context_photos", "images"))[1])
    shown = []
    for i, item in enumerate(top[:TOP_SHOWN]):
        ident = _id_of(item)
        shown.append(thumbs.thumb(root, ident, hit=str(ident) == str(target), caption=f"#{i + 1} {ident}"))
    found = any(t["hit"] for t in shown)
    return {"kind": "retrieval", "title_key": title_key or "example", "title": _text(title),
            "target": str(target), "rank": _rank_text(ex), "captions": captions,
            "context": [thumbs.thumb(root, c) for c in context[:TOP_SHOWN]], "top": shown,
            "top_shown": TOP_SHOWN,
            "missing_target": None if found else thumbs.thumb(root, target, hit=True, caption=str(target))}


def _render_dialog(ex: dict, thumbs: Thumbnails, root: Path | None) -> dict | None:
    question = ex.get("question")
    top = _top_list(ex)
    _, top_answers = _first(ex, ("top_answers", "top_answer_texts", "top5_answers"))
    _, options = _first(ex, ("options", "answer_options", "candidates"))
    if question is None or (top is None and not top_answers):
        return None
    _, gt = _first(ex, ("gt_index", "gt", "answer_index", "target"))
    gt_answer = ex.get("gt_answer") or ex.get("answer")
    if gt_answer is None and isinstance(options, list) and isinstance(gt, int) and 0 <= gt < len(options):
        gt_answer = options[gt]
    if gt_answer is None and isinstance(top_answers, list) and top and gt is not None:
        gt_answer = next((a for i, a in zip(top, top_answers) if str(i) == str(gt)), None)
    _, image_id = _first(ex, ("image_id", "image"))
    entries = []
    for i in range(min(TOP_SHOWN, max(len(top or []), len(top_answers or [])))):
        index = top[i] if top and i < len(top) else None
        if isinstance(top_answers, list) and i < len(top_answers):
            text = str(top_answers[i])
        elif isinstance(options, list) and isinstance(index, int) and 0 <= index < len(options):
            text = str(options[index])
        else:
            text = f"option #{index}"
        hit = (index is not None and gt is not None and str(index) == str(gt)) or (
            index is None and gt_answer is not None and text == str(gt_answer))
        entries.append({"text": text, "index": _text(index), "hit": hit,
                        "index_shown": index is not None and not text.startswith("option #")})
    gt_text = f"gt: {gt_answer} (#{gt})" if gt_answer is not None else f"gt: option #{gt}"
    return {"kind": "dialog", "image": thumbs.thumb(root, image_id), "image_id": _text(image_id),
            "round": _text(ex.get("round")), "question": str(question), "gt_text": gt_text, "rank": _rank_text(ex),
            "answers": entries}


def _render_caption(ex: dict, thumbs: Thumbnails, root: Path | None) -> dict | None:
    _, image = _first(ex, ("image", "image_id", "id"))
    text_key, text = _first(ex, ("generated", "caption", "prediction", "text"))
    if image is None or text is None:
        return None
    refs = _as_text_list(ex.get("references"))
    top = _top_list(ex)
    extra = f" {_rank_text(ex)}" if _first(ex, RANK_KEYS)[0] else ""
    if top:
        extra += "; top: " + ", ".join(str(_id_of(t)) for t in top[:TOP_SHOWN])
    return {"kind": "caption", "image": thumbs.thumb(root, image), "image_id": str(image), "extra": extra,
            "text_key": text_key, "text": str(text), "refs": refs[:5]}


def _examples_for(run: Run, task: str, setting: Any, thumbs: Thumbnails) -> list[dict]:
    """The blocks of one task's examples: a heading, maybe a note, up to MAX_EXAMPLES examples."""
    candidates = sorted((r for r in run.ok_evals if str(r.get("task")) == task and r.get("setting") == setting
                         and r.get("predictions_file")), key=lambda r: precision_key(r.get("precision")))
    title = _label(task, setting)
    for rec in candidates:
        path = Path(str(rec["predictions_file"]))
        path = path if path.is_absolute() else run.run_dir / path
        if not path.is_file():
            continue
        root = thumbs.root_for(task, setting)
        rendered = []
        try:
            examples = list(_read_examples(path))
        except OSError:
            continue
        renderers = (_render_dialog, _render_retrieval, _render_caption)
        for ex in examples:
            for render in renderers:
                try:
                    out = render(ex, thumbs, root)
                except Exception:  # an odd example is skipped, not fatal
                    out = None
                if out:
                    rendered.append(out)
                    break
            if len(rendered) >= MAX_EXAMPLES:
                break
        if not rendered:
            return [{"kind": "h3", "text": title, "where": None},
                    _note("The predictions have no fields this report knows how to show.")]
        where = f"protocol {rec.get('protocol')} at {rec.get('precision')}"
        hint = [] if root else [_note("No image directory given for this task: thumbnails are placeholders.")]
        return [{"kind": "h3", "text": title, "where": where}, *hint, *rendered]
    return []


def _qualitative(run: Run, thumbs: Thumbnails) -> dict | None:
    blocks = [b for task, setting in run.task_settings() for b in _examples_for(run, task, setting, thumbs)]
    if not blocks:
        return None
    return _section("examples", "Qualitative examples", *blocks, nav="Examples")


def _skipped_data(run: Run) -> dict | None:
    rows = []
    for r in sorted(run.evals, key=lambda r: (str(r.get("task")), str(r.get("setting")),
                                              precision_key(r.get("precision")), str(r.get("protocol")))):
        head = [_cell(r.get(k)) for k in ("task", "setting", "protocol", "precision")]
        if r.get("status", "ok") != "ok":
            rows.append(_row(head + [_cell("cell skipped: " + str(r.get("reason")), colspan=4, cls="skipped")]))
            continue
        reasons = r.get("skipped") if isinstance(r.get("skipped"), dict) else {}
        examples = r.get("skipped_examples") if isinstance(r.get("skipped_examples"), list) else []
        reason_pieces = [x for k, v in reasons.items() for x in (BR, f"{k}: {_text(v)}")][1:] or [DASH]
        listed = {"details": f"{len(examples)} listed", "lines": [_text(e) for e in examples]} if examples else DASH
        rows.append(_row(head + [_cell(r.get("n_examples"), cls="num"), _cell(r.get("n_skipped", 0), cls="num"),
                                 _cell(*reason_pieces), _cell(listed)]))
    if not rows:
        return None
    headers = ["Task", "Setting", "Protocol", "Precision", "Examples", "Skipped", "Reasons", "Skipped examples"]
    return _section("skipped", "Skipped data", _table(headers, rows, "skipped-table"))


def _environment(run: Run) -> dict:
    env = run.doc.get("environment")
    config = run.doc.get("config")
    def dump(v: Any) -> dict:
        return {"kind": "pre", "text": json.dumps(v, indent=2, sort_keys=True, default=str)}

    return _section("environment", "Environment and configuration", {"kind": "h3", "text": "Environment"},
                    dump(env), {"kind": "h3", "text": "Configuration"}, dump(config), nav="Environment")


# ---------------------------------------------------------------------------------------------- speed-ups

BENCHMARKS_FILE = "benchmarks.json"  # pytest-benchmark's --benchmark-json output (`nox -s bench`)


def read_benchmarks(path: Path) -> dict:
    """A pytest-benchmark JSON file (`nox -s bench` writes runs/bench/benchmarks.json)."""
    from model.errors import FromageInputError, read_json

    document = read_json(path, "benchmarks file not found", "`nox -s bench` writes runs/bench/benchmarks.json")
    if not isinstance(document, dict) or not isinstance(document.get("benchmarks"), list):
        raise FromageInputError(path, "not a pytest-benchmark JSON file (no `benchmarks` list)")
    return document


def _speedups(benchmarks: dict | None) -> dict | None:
    """The fast paths against the original scripts' way of working (issue targets and whether they were met)."""
    if not benchmarks:
        return None
    rows = []
    for b in benchmarks["benchmarks"]:
        if not isinstance(b, dict):
            continue
        extra = b.get("extra_info") if isinstance(b.get("extra_info"), dict) else {}
        fast, naive = _get(b, "stats", "min"), extra.get("naive_seconds")
        speedup, target = extra.get("speedup"), extra.get("target")
        met: Any = DASH
        if _is_num(speedup) and _is_num(target):
            met = _span("met", "pos") if speedup >= target else _span("missed", "neg")
        rows.append(_row([_cell(b.get("name")), _cell(fmt_num(fast, 3), cls="num"),
                          _cell(fmt_num(naive, 3), cls="num"), _cell(f"{_text(fmt_num(speedup, 1))}x", cls="num"),
                          _cell(f"{_text(fmt_num(target, 0))}x", cls="num"), _cell(met)]))
    cpu = _get(benchmarks, "machine_info", "cpu", "brand_raw") or _get(benchmarks, "machine_info", "processor")
    note = _note(f"pytest-benchmark run of {benchmarks.get('datetime', '?')} on {cpu or 'an unknown CPU'}: the "
                 "fastest round of each fast path against the reference path written the way the original "
                 "scripts work, on the same model and inputs (outputs asserted identical).")
    headers = ["Benchmark", "Fast path s", "Original-style s", "Speed-up", "Target", ""]
    return _section("speedups", "Speed-ups", _table(headers, rows, "speedup-table"), note)


# ---------------------------------------------------------------------------------------------- assembly

def render_report(document: dict, run_dir: Path, image_roots: dict[str, Path] | None = None,
                  benchmarks: dict | None = None) -> str:
    run = Run(document, Path(run_dir))
    thumbs = Thumbnails(image_roots)
    sections = [_paper_tables(run), _summary(run), _accuracy(run), _cost(run), _profile(run), _speedups(benchmarks), _plots(run),
                _qualitative(run, thumbs), _skipped_data(run), _environment(run)]
    return _environment_for_templates().get_template("report.html.j2").render(
        title=f"fromage-bench report \u2014 {run.run_dir.name}", csp=CSP, sections=[s for s in sections if s])


_JINJA: jinja2.Environment | None = None


def _environment_for_templates() -> jinja2.Environment:
    """The templates' Jinja2 environment: autoescape on for every template (escaping is the default, so
    dataset text cannot become markup), None shown as an em dash."""
    global _JINJA
    if _JINJA is None:
        _JINJA = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                    keep_trailing_newline=True,
                                    finalize=lambda value: DASH if value is None else value)
    return _JINJA


def _default_image_roots(document: dict) -> dict[str, Path]:
    """Image directories named by the run's own config (data_root + each task's image files), where they exist."""
    roots: dict[str, Path] = {}
    try:
        data_root = Path(str((document.get("config") or {}).get("data_root")))
        if not data_root.is_dir():
            return roots
        from tasks import REGISTRY

        for name, task in REGISTRY.items():
            for role, rel in task.files.items():
                if "image" in role.lower() and (data_root / rel).is_dir():
                    setting, _, _ = role.rpartition("/")
                    roots.setdefault(_label(name, setting or None), data_root / rel)
    except Exception:  # the defaults are a convenience: without them thumbnails are placeholders
        return {}
    return roots


def write_report(run_dir: Path, *, image_roots: dict[str, Path] | None = None, benchmarks: Path | None = None) -> Path:
    """Write `run_dir/report.html` (atomically) from `run_dir/results.json` and return its path. The speed-up
    table comes from `benchmarks` (a pytest-benchmark JSON), else from `run_dir/benchmarks.json` if present."""
    run_dir = Path(run_dir)
    document = read_results(run_dir)
    if image_roots is None:
        image_roots = _default_image_roots(document)
    if benchmarks is None and (run_dir / BENCHMARKS_FILE).is_file():
        benchmarks = run_dir / BENCHMARKS_FILE
    text = render_report(document, run_dir, image_roots, read_benchmarks(benchmarks) if benchmarks else None)
    path = run_dir / REPORT_FILE
    atomic_write_text(path, text)
    return path


def parse_image_roots(values: Iterable[str] | dict | None) -> dict[str, Path] | None:
    """`["vist_retrieval=/data/vist/images", ...]` (CLI form) or a dict -> {task: Path}."""
    if values is None:
        return None
    if isinstance(values, dict):
        return {str(k): Path(v) for k, v in values.items()}
    out: dict[str, Path] = {}
    for item in values:
        task, sep, directory = str(item).partition("=")
        if not sep or not task or not directory:
            from model.errors import FromageInputError

            raise FromageInputError(f"--images {item!r}", "expected TASK=DIRECTORY")
        out[task.strip()] = Path(directory.strip())
    return out


def main_report(run_dir: str | Path, image_roots: Iterable[str] | dict | None = None,
                benchmarks: str | Path | None = None) -> Path:
    """CLI hook for `fromage-bench report RUN_DIR [--images TASK=DIR ...] [--benchmarks FILE]`."""
    return write_report(Path(run_dir), image_roots=parse_image_roots(image_roots),
                        benchmarks=Path(benchmarks) if benchmarks else None)
