"""`fromage-bench reproduce`: the paper's Table 1 (VIST contextual image retrieval, three settings) and Table 2
(VisDial image retrieval and answer ranking) for each model given, under both protocols.

    fromage-bench reproduce --data-root D [--fromage DIR] [--fromage-vis4 DIR] [--clip ID|DIR] [--gill DIR]
                            --out OUT [--precision P]

Each model is one `eval` run (the runner of `fromage-bench eval`) into OUT/<label>/: a run killed midway resumes
from its journal, and a model whose run finished with the same configuration is not run again. Then:

* OUT/results.json: every model's records, each with `"model": <label>`, and `"models": {label: {family,
  label, source}}` at the top (docs/results-schema.md); `"data"` says whether the data is the paper's;
* OUT/tables.md and OUT/tables.csv: the tables in the paper's layout (rows model x setting; per metric our
  number under the paper protocol, under the corrected protocol, and the paper's), written by `write_tables`
  from `paper_tables`, which the HTML report renders too;
* OUT/report.html, which leads with the same tables.

With no model given it runs the embedded default: the miniworld data, the stand-in FROMAGe and the stand-in CLIP.

Whether the data is the paper's (`paper_data`): not when the data root holds the miniworld's manifest
(`miniworld/manifest.json`), when the run was limited (`--limit`), or when VisDial ran on other than the 2,064
dialogues of VisDial v1.0 val; nor when the data root is not there to look at and VisDial did not run (unknown).
On other data the tables show each metric's chance level (`tasks.chance`) where a difference to the paper
would mean nothing.
"""
from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from model.errors import FromageInputError

from .results import atomic_write_text, read_results, write_results

TASKS = "vist_retrieval,visdial_retrieval,visdial_ranking"
PROTOCOLS = "paper,corrected"
TABLES_MD, TABLES_CSV = "tables.md", "tables.csv"
VISDIAL_VAL_DIALOGUES = 2064  # VisDial v1.0 val (the spec's count)
MINIWORLD_MANIFEST = "miniworld/manifest.json"  # fromage_bench.miniworld.MANIFEST, written by `data synth`
# Config keys that do not change what a finished run measured: a run differing only in them is not redone.
NOT_COMPARED = ("progress", "keep_journal", "image_workers", "cache_dir")


@dataclass(frozen=True)
class ModelSpec:
    label: str    # OUT/<label>/ and the records' "model"
    family: str   # "fromage", "clip", "gill"
    source: str   # a directory, or a hub id (CLIP)
    name: str     # how the tables name it


# the flags, in the order the tables list the models
MODEL_FLAGS = (("clip", "clip", "CLIP"), ("fromage", "fromage", "FROMAGe"),
               ("fromage_vis4", "fromage", "FROMAGe (4 visual tokens)"), ("gill", "gill", "GILL"))
# the paper's name of each family's row; FROMAGe's numbers are the tasks' own `paper`
PAPER_ROW_NAMES = {"clip": "CLIP ViT-L/14", "gill": "GILL"}


# -- the tables' layout ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableSpec:
    key: str
    title: str
    task: str
    settings: tuple[str, ...]
    metrics: tuple[str, ...]


TABLE_SPECS = (
    TableSpec("table1", "Table 1: VIST contextual image retrieval", "vist_retrieval", ("1cap", "5cap", "5cap4img"),
              ("R@1", "R@5", "R@10")),
    TableSpec("table2_ir", "Table 2: VisDial image retrieval", "visdial_retrieval", ("val",), ("R@1", "R@5", "R@10")),
    TableSpec("table2_ranking", "Table 2: VisDial answer ranking", "visdial_ranking", ("val",),
              ("NDCG", "MRR", "R@1", "R@5", "R@10")),
)
OURS = ("paper", "corrected")  # our columns: the protocols
COLUMNS = (*OURS, "reported")  # ... and the paper's number
COLUMN_HEADS = {"paper": "(p)", "corrected": "(c)", "reported": "paper"}  # tables.md and the report
CSV_HEADS = {"paper": "ours (paper protocol)", "corrected": "ours (corrected)", "reported": "paper"}
LEGEND = ("(p): ours under the paper protocol (the original scripts' computation); (c): ours under the corrected "
          "protocol; paper: the paper's number (the paper protocol's row)")


@dataclass
class Cell:
    value: float | None = None
    stderr: float | None = None
    skipped: str | None = None  # the reason the cell was not run


@dataclass
class TableRow:
    model: str             # the row's name ("FROMAGe", "CLIP", "chance (random ranking)")
    label: str | None      # the model's label; None for the chance row
    setting: str
    kind: str = "model"    # "model" or "chance"
    precision: str | None = None
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)  # (metric, column) -> cell
    note: str = ""


@dataclass
class Table:
    spec: TableSpec
    rows: list[TableRow]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def paper_numbers(family: str, task: str, setting: str) -> dict[str, float] | None:
    """The paper's numbers for a family's row of a task and setting (under the paper protocol), if it has them."""
    from tasks import REGISTRY

    return REGISTRY[task].paper_numbers(setting, "paper", family)


def _precision_order(p: Any) -> int:
    from .runner import PRECISION_ORDER

    return PRECISION_ORDER.index(p) if p in PRECISION_ORDER else len(PRECISION_ORDER)


def models_of(document: dict) -> dict[str, dict]:
    """label -> {family, label, source, name}: a reproduce document's `models`, an eval document's `model`
    (FAM's contract), or one FROMAGe model named by the config of an older eval document."""
    if isinstance(document.get("models"), dict):
        return {str(k): dict(v) for k, v in document["models"].items() if isinstance(v, dict)}
    model = document.get("model")
    if isinstance(model, dict):
        label = str(model.get("label") or model.get("family") or "model")
        return {label: dict(model, label=label)}
    config = document.get("config") if isinstance(document.get("config"), dict) else {}
    return {"model": {"family": "fromage", "label": "model", "source": config.get("model_dir")}}


def record_model(record: dict, models: dict[str, dict]) -> str:
    return str(record.get("model")) if record.get("model") is not None else next(iter(models))


def paper_tables(document: dict) -> list[Table]:
    """Tables 1 and 2 from a results document (reproduce's combined one or one eval run): a row per model and
    setting that ran (and a chance row per setting), each metric under each protocol and the paper's number.
    A model's row takes its highest precision that ran."""
    models = models_of(document)
    records = [r for r in document.get("records") or [] if isinstance(r, dict) and r.get("kind", "eval") == "eval"]
    tables = []
    for spec in TABLE_SPECS:
        rows = []
        mine = [r for r in records if r.get("task") == spec.task]
        if not mine:
            continue
        for setting in spec.settings:
            here = [r for r in mine if r.get("setting") in (setting, None)]
            for label in _ordered_labels(models, here):
                rows.append(_model_row(spec, setting, label, models[label],
                                       [r for r in here if record_model(r, models) == label]))
            chance = _chance_row(spec, setting, [r for r in here if r.get("status", "ok") == "ok"])
            if chance is not None:
                rows.append(chance)
        if rows:
            tables.append(Table(spec, rows))
    return tables


def _ordered_labels(models: dict[str, dict], records: list[dict]) -> list[str]:
    present = {record_model(r, models) for r in records}
    order = {family: i for i, (_, family, _) in enumerate(MODEL_FLAGS)}
    return sorted((label for label in models if label in present),
                  key=lambda label: (order.get(models[label].get("family"), len(order)), label))


def _model_row(spec: TableSpec, setting: str, label: str, model: dict, records: list[dict]) -> TableRow:
    family = str(model.get("family") or "fromage")
    ok = [r for r in records if r.get("status", "ok") == "ok" and r.get("setting") == setting]
    precision = min((r.get("precision") for r in ok), key=_precision_order, default=None)
    row = TableRow(model=str(model.get("name") or _default_name(family, label)), label=label, setting=setting,
                   precision=precision)
    by_protocol = {r.get("protocol"): r for r in ok if r.get("precision") == precision}
    skipped = next((r for r in records if r.get("status") == "skipped"), None)
    paper = paper_numbers(family, spec.task, setting) or {}
    for metric in spec.metrics:
        for protocol in OURS:
            rec = by_protocol.get(protocol)
            if rec is None:
                reason = skipped.get("reason") if skipped is not None else "not run"
                row.cells[(metric, protocol)] = Cell(skipped=str(reason))
                continue
            value = _num((rec.get("metrics") or {}).get(metric))
            stderr = _num(((rec.get("uncertainty") or {}).get("stderr") or {}).get(metric))
            row.cells[(metric, protocol)] = Cell(value, stderr)
        row.cells[(metric, "reported")] = Cell(_num(paper.get(metric)))
    if skipped is not None and not ok:
        row.note = f"skipped: {skipped.get('reason')}"
    elif family == "fromage" and label != "fromage" and "vis4" in label:
        row.note = "the paper's numbers are the 1-visual-token model's"
    return row


def _default_name(family: str, label: str) -> str:
    names = {flag: name for flag, _, name in MODEL_FLAGS}
    return names.get(label.replace("-", "_"), {"clip": "CLIP", "gill": "GILL"}.get(family, "FROMAGe"))


def _chance_row(spec: TableSpec, setting: str, ok: list[dict]) -> TableRow | None:
    """Each protocol's chance levels (the same data for every model: the first record that has them)."""
    row = TableRow(model="chance (random ranking)", label=None, setting=setting, kind="chance")
    found = False
    for metric in spec.metrics:
        for protocol in OURS:
            level = next((_num(r["chance"].get(metric)) for r in ok if r.get("setting") == setting
                          and r.get("protocol") == protocol and isinstance(r.get("chance"), dict)
                          and _num(r["chance"].get(metric)) is not None), None)
            found = found or level is not None
            row.cells[(metric, protocol)] = Cell(level)
        row.cells[(metric, "reported")] = Cell()
    return row if found else None


# -- tables.md and tables.csv: the one writer ------------------------------------------------------------------
def cell_text(cell: Cell, digits: int = 2) -> str:
    if cell.skipped is not None:
        return "skipped"
    if cell.value is None:
        return "\u2014"
    text = f"{cell.value:.{digits}f}"
    return f"{text} \u00b1 {cell.stderr:.{digits}f}" if cell.stderr is not None else text


def tables_markdown(tables: list[Table], paper_data: tuple[bool, str]) -> str:
    out = ["# The paper's tables, reproduced", "", data_sentence(paper_data), ""]
    for table in tables:
        spec = table.spec
        head = ["Model", "Setting"] + [f"{m} {COLUMN_HEADS[c]}" for m in spec.metrics for c in COLUMNS] + ["Note"]
        out += [f"## {spec.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in table.rows:
            cells = [_md(row.model), row.setting] + [cell_text(row.cells[(m, c)]) for m in spec.metrics
                                                     for c in COLUMNS]
            note = row.note or _skip_note(row)
            out.append("| " + " | ".join(cells + [_md(note)]) + " |")
        out += ["", LEGEND + ". Numbers in percent; \u00b1 one bootstrap standard error where the run has one.", ""]
    return "\n".join(out)


def data_sentence(paper_data: tuple[bool, str]) -> str:
    is_paper, why = paper_data
    if is_paper:
        return f"Data: the paper's datasets ({why})."
    return (f"Data: not the paper's ({why}): a difference to the paper's numbers means nothing here; compare with "
            "the chance rows (a random ranking of the same candidates).")


def _skip_note(row: TableRow) -> str:
    reasons = sorted({c.skipped for c in row.cells.values() if c.skipped is not None})
    return "; ".join(f"skipped: {r}" for r in reasons)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def tables_csv(tables: list[Table]) -> str:
    """The same rows as tables.md, numbers at full precision: per metric and column its value, and for our
    columns the standard error; a skipped cell reads `skipped` and the row's note gives the reason."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for table in tables:
        spec = table.spec
        columns = [f"{m} {CSV_HEADS[c]}" for m in spec.metrics for c in COLUMNS]
        stderrs = [f"{m} {CSV_HEADS[c]} stderr" for m in spec.metrics for c in OURS]
        writer.writerow(["table", "model", "label", "setting", "kind", "precision", *columns, *stderrs, "note"])
        for row in table.rows:
            values = [_csv_value(row.cells[(m, c)]) for m in spec.metrics for c in COLUMNS]
            errors = [_csv_number(row.cells[(m, c)].stderr) for m in spec.metrics for c in OURS]
            writer.writerow([spec.key, row.model, row.label or "", row.setting, row.kind, row.precision or "",
                             *values, *errors, row.note or _skip_note(row)])
    return buffer.getvalue()


def _csv_value(cell: Cell) -> str:
    return "skipped" if cell.skipped is not None else _csv_number(cell.value)


def _csv_number(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def write_tables(out: Path, document: dict) -> tuple[Path, Path]:
    tables = paper_tables(document)
    verdict = paper_data(document)
    md, csv_path = Path(out) / TABLES_MD, Path(out) / TABLES_CSV
    atomic_write_text(md, tables_markdown(tables, verdict) + "\n")
    atomic_write_text(csv_path, tables_csv(tables))
    return md, csv_path


# -- is the data the paper's? -----------------------------------------------------------------------------------
def paper_data(document: dict) -> tuple[bool, str]:
    """(the data is the paper's, why we think so): see the module docstring. A document that says (reproduce's
    `data`) is taken at its word."""
    said = document.get("data")
    if isinstance(said, dict) and isinstance(said.get("paper_data"), bool):
        return said["paper_data"], str(said.get("why", ""))
    config = document.get("config") if isinstance(document.get("config"), dict) else {}
    root = config.get("data_root")
    if root and (Path(str(root)) / MINIWORLD_MANIFEST).is_file():
        return False, f"the miniworld ({Path(str(root)) / MINIWORLD_MANIFEST})"
    if config.get("limit") is not None:
        return False, f"limited to the first {config['limit']} examples of each task"
    dialogues = _visdial_dialogues(document.get("records") or [])
    if dialogues is not None and dialogues != VISDIAL_VAL_DIALOGUES:
        return False, f"VisDial has {dialogues} dialogues, not the {VISDIAL_VAL_DIALOGUES} of v1.0 val"
    if dialogues is None and not (root and Path(str(root)).is_dir()):
        return False, "unknown: the data root is not here to look at and VisDial did not run"
    return True, f"no miniworld manifest under {root}" + (
        f", VisDial has its {VISDIAL_VAL_DIALOGUES} val dialogues" if dialogues is not None else "")


def _visdial_dialogues(records: Iterable[dict]) -> int | None:
    """The dialogues in the VisDial file a run read: those evaluated plus those skipped for their image."""
    for r in records:
        if isinstance(r, dict) and r.get("task") == "visdial_retrieval" and r.get("status", "ok") == "ok":
            extra = r.get("extra") if isinstance(r.get("extra"), dict) else {}
            if isinstance(extra.get("pool_size"), int):
                return extra["pool_size"] + int(r.get("n_skipped") or 0)
        if isinstance(r, dict) and r.get("task") == "visdial_ranking" and r.get("status", "ok") == "ok":
            extra = r.get("extra") if isinstance(r.get("extra"), dict) else {}
            if isinstance(extra.get("dialogues"), int):
                return extra["dialogues"] + int(r.get("n_skipped") or 0)
    return None


# -- running -------------------------------------------------------------------------------------------------
@dataclass
class ReproduceConfig:
    out: Path
    data_root: Path
    models: list[ModelSpec]
    precision: str | None = None
    device: str | None = None
    limit: int | None = None
    batch_size: int = 16
    cache_dir: Path | None = None
    progress: bool = True


def models_from_args(args) -> list[ModelSpec]:
    models = []
    for flag, family, name in MODEL_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            models.append(ModelSpec(flag.replace("_", "-"), family, str(value), name))
    return models


def embedded_models(work: Path) -> tuple[Path, list[ModelSpec]]:
    """The embedded default: (the miniworld data root, [the stand-in FROMAGe, the stand-in CLIP]), built if missing.
    The stand-in CLIP (with its text tower) comes from `embedded.standin_clip_dir` (issue 16 part A)."""
    from . import embedded

    release, _ = embedded.ensure_model(work)
    return work / "data", [ModelSpec("clip", "clip", str(embedded.standin_clip_dir(work)), "CLIP"),
                           ModelSpec("fromage", "fromage", str(release), "FROMAGe")]


def eval_config(config: ReproduceConfig, model: ModelSpec):
    """The `eval` configuration of one model's run (OUT/<label>/)."""
    from .runner import EvalConfig

    values: dict[str, Any] = {"tasks": TASKS, "out": config.out / model.label, "data_root": config.data_root,
                              "protocols": PROTOCOLS, "precisions": [config.precision] if config.precision else [],
                              "device": config.device, "limit": config.limit, "batch_size": config.batch_size,
                              "cache_dir": config.cache_dir, "progress": config.progress}
    values["label"] = model.label
    check_source(model)
    if model.family == "clip":
        values["clip"] = model.source  # a CLIP directory or a hub id in the local cache (eval --clip)
    else:
        values["model_dir"] = Path(model.source)
    return EvalConfig(**values)


def check_source(model: ModelSpec) -> None:
    """Bad input before any model runs: a source that is not there, or a directory of another family than its
    flag's."""
    from model.clip_baseline import resolve_clip_source
    from model.loading import detect_family

    flag = f"--{model.label}"
    if model.family == "clip":
        resolve_clip_source(model.source)
        return
    source = Path(model.source)
    if not source.is_dir():
        raise FromageInputError(source, f"not a directory ({flag} needs a {model.family} model directory)")
    found = detect_family(source)
    if found != model.family:
        raise FromageInputError(source, f"a {found} model directory, but {flag} takes a {model.family} one")


def finished(eval_cfg) -> bool:
    """A results file in the model's directory from a run with this configuration, of the model as its files are
    now (`model.family.source_state`: one retrained in place is run again): nothing to redo."""
    from .runner import model_entry

    path = eval_cfg.out / "results.json"
    if not path.is_file():
        return False
    try:
        document = read_results(path)
    except FromageInputError:
        return False
    done, wanted = document.get("config") or {}, eval_cfg.to_json()
    same_model = (document.get("model") or {}).get("source_state") == model_entry(eval_cfg)["source_state"]
    return same_model and all(done.get(k) == v for k, v in wanted.items() if k not in NOT_COMPARED)


def run_reproduce(config: ReproduceConfig, run_eval: Callable | None = None) -> Path:
    """Run each model (resuming or reusing what is done), then write the combined results, the tables and the
    report. A model that cannot be loaded raises FromageInputError before any table is written."""
    from .environment import describe_environment
    from .runner import check_output_dir
    from .runner import run_eval as default_run_eval

    run_eval = run_eval or default_run_eval
    if not config.models:
        raise FromageInputError("reproduce", "no model given (--fromage, --fromage-vis4, --clip, --gill)")
    labels = [m.label for m in config.models]
    if len(set(labels)) != len(labels):
        raise FromageInputError("reproduce", f"a model given twice: {', '.join(labels)}")
    configs = [(model, eval_config(config, model)) for model in config.models]  # bad sources fail before any run
    check_output_dir(config.out)
    for stale in (TABLES_MD, TABLES_CSV, "results.json"):  # tables of an earlier request: gone until this one is done
        (config.out / stale).unlink(missing_ok=True)
    documents = {}
    for model, eval_cfg in configs:
        if finished(eval_cfg):
            print(f"[reproduce] {model.label}: finished in {eval_cfg.out} (not rerun)", flush=True)
        else:
            print(f"[reproduce] {model.label}: eval into {eval_cfg.out}", flush=True)
            run_eval(eval_cfg)
        documents[model.label] = read_results(eval_cfg.out)
    document = combine(config, documents, describe_environment())
    path = write_results(config.out, document)
    write_tables(config.out, document)
    return path


def combine(config: ReproduceConfig, documents: dict[str, dict], environment: dict) -> dict:
    """One document from the models' runs: records tagged with their model's label, `models` at the top."""
    records, models = [], {}
    for model in config.models:
        doc = documents[model.label]
        recorded = doc.get("model") if isinstance(doc.get("model"), dict) else {}
        models[model.label] = {"family": recorded.get("family", model.family), "label": model.label,
                               "source": recorded.get("source", model.source), "name": model.name,
                               "run": model.label}
        for r in doc.get("records") or []:
            r = dict(r, model=model.label)
            if r.get("predictions_file"):
                r["predictions_file"] = f"{model.label}/{r['predictions_file']}"
            records.append(r)
    document = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": {"command": "reproduce", "data_root": str(config.data_root), "out": str(config.out),
                           "tasks": TASKS, "protocols": PROTOCOLS, "precision": config.precision,
                           "device": config.device, "limit": config.limit, "batch_size": config.batch_size},
                "environment": environment, "models": models, "records": records}
    verdict, why = paper_data(document)
    document["data"] = {"root": str(config.data_root), "paper_data": verdict, "why": why}
    return document


# -- CLI ------------------------------------------------------------------------------------------------------
def add_reproduce_parser(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="the paper's Tables 1 and 2 for each model given, both protocols: "
                                                "OUT/tables.md, tables.csv, results.json, report.html")
    p.add_argument("--data-root", type=Path, help="the datasets (see `tasks`); default with no model: the miniworld")
    p.add_argument("--fromage", type=Path, metavar="DIR", help="a FROMAGe release directory (1 visual token)")
    p.add_argument("--fromage-vis4", type=Path, metavar="DIR", help="the 4-visual-token FROMAGe release directory")
    p.add_argument("--clip", metavar="ID|DIR", help="a CLIP model: a directory or a hub id in the local cache")
    p.add_argument("--gill", type=Path, metavar="DIR", help="a GILL release directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--precision", help="fp32, bf16, fp16 or int8 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", help="cpu or cuda[:N]")
    p.add_argument("--limit", type=int, help="first N examples of each task (the tables then show chance levels)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, help="image feature cache (default ~/.cache/fromage-bench/features)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--work", type=Path, help="the embedded default's build cache (default runs/embedded-cache)")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    from .cli import _write_report
    from .runner import default_cache_dir

    models = models_from_args(args)
    data_root = args.data_root
    if not models:
        from .embedded import DEFAULT_WORK

        work = args.work or DEFAULT_WORK
        print(f"fromage-bench: no model given: the embedded default ({work}; built there if missing)", file=sys.stderr,
              flush=True)
        embedded_data, models = embedded_models(work)
        data_root = data_root or embedded_data
    if data_root is None:
        raise FromageInputError("--data-root", "required when a model is given")
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    config = ReproduceConfig(out=args.out, data_root=data_root, models=models, precision=args.precision,
                             device=args.device, limit=args.limit, batch_size=args.batch_size, cache_dir=cache_dir,
                             progress=not args.no_progress)
    path = run_reproduce(config)
    print(f"wrote {path}, {args.out / TABLES_MD}, {args.out / TABLES_CSV}")
    _write_report(args.out)
    return 0
