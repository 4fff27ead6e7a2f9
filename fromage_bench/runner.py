"""`fromage-bench eval`: a tasks x precisions matrix. Each precision is one model load; each cell records
the task's metrics and what it cost. Results are written once, atomically, at the end: a failed run
leaves no partial results file."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import PRECISIONS, FromageInputError, resolve_placement
from model.errors import require_known
from model.family import model_record
from model.loading import detect_family, load_model
from tasks import REGISTRY, parse_protocols, parse_task_spec
from tasks.base import RunContext, TaskResult
from tasks.cache import FeatureCache
from tasks.journal import ProcessGroupInfo

from .bootstrap import uncertainty
from .environment import describe_environment
from .results import atomic_write_text, write_results
from .trackers import MemoryTracker, Stopwatch, cell_latency, examples_rate, release_memory, throughput

PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8")  # highest first: drift is measured against the first run


@dataclass
class EvalConfig:
    tasks: str
    out: Path
    data_root: Path = Path("data")
    model_dir: Path | None = None
    opt_version: str | None = None
    visual_model: str | None = None
    device: str | None = None
    precisions: list[str] = field(default_factory=lambda: [])
    protocols: str | None = None
    limit: int | None = None
    batch_size: int = 16
    option_batch_size: int = 100  # VisDial answer options per packed scoring pass (100: a round in one pass)
    image_workers: int | None = None  # None: model.images.default_workers
    seed: int = 0
    random_init: bool = False
    retrieval_set: Path | None = None
    accept_foreign_retrieval_set: bool = False
    cache_dir: Path | None = None
    progress: bool = True
    keep_journal: bool = False
    clip: str | None = None   # a CLIP model (directory or cached hub id) instead of --model-dir
    label: str | None = None  # the model's name in the results (default: its family)

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fromage-bench" / "features"


def check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"  # one per process: torchrun ranks check at once
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise FromageInputError(out, f"output directory is not writable: {err.strerror or err}") from None


def validate(config: EvalConfig) -> list:
    """Everything that can be checked before a model is loaded."""
    cells = parse_task_spec(config.tasks)
    for task, setting in cells:
        task.check_files(config.data_root, setting)
        parse_protocols(config.protocols, task)
    require_known("precision", config.precisions, PRECISIONS, "precision")
    if config.limit is not None and config.limit < 1:
        raise FromageInputError("--limit", "must be >= 1")
    if config.option_batch_size < 1:
        raise FromageInputError("--option-batch-size", "must be >= 1")
    if config.image_workers is not None and config.image_workers < 0:
        raise FromageInputError("--image-workers", "must be >= 0 (0 decodes images in the main process)")
    if config.model_dir is None and not config.random_init and config.clip is None:
        raise FromageInputError("--model-dir", "required (or --clip, or --random-init)")
    model_family(config)  # an unknown model directory fails here, before any model work
    check_output_dir(config.out)
    return cells


def model_family(config: EvalConfig) -> str:
    if config.clip is not None:
        if config.model_dir is not None:
            raise FromageInputError("--clip", "give either --clip or --model-dir, not both")
        return "clip"
    return detect_family(config.model_dir) if config.model_dir is not None else "fromage"


def model_entry(config: EvalConfig) -> dict:
    """The results' top-level "model": family, label, source (directory or hub id)."""
    family = model_family(config)
    source = config.clip if config.clip is not None else config.model_dir
    if source is None:
        source = "random-init"
    return model_record(family, config.label or family, source)


def run_eval(config: EvalConfig) -> Path:
    """Run the matrix. Under torchrun every rank runs this: examples are sharded inside the tasks
    (tasks/journal.py) and rank 0 alone writes the results."""
    group = init_distributed(config.device)
    if group.world_size > 1 and config.device is None:
        config = dataclasses.replace(config, device=default_rank_device(group))
    cells = validate(config)
    placement_default = resolve_placement(config.device, None)  # bad --device fails here, before anything runs
    precisions = config.precisions or [placement_default.precision]
    staging = config.out / f".staging-rank{group.rank}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "predictions").mkdir(parents=True)
    journal = config.out / ".journal"
    records: list[dict] = []
    path = config.out / "results.json"
    try:
        for precision in precisions:
            records += _run_precision(config, cells, precision, staging, journal, group)
        if group.rank == 0:
            _add_drift(records)
            final_predictions = config.out / "predictions"
            shutil.rmtree(final_predictions, ignore_errors=True)
            (staging / "predictions").rename(final_predictions)
            path = write_results(config.out, {
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": model_entry(config),
                "config": config.to_json(), "environment": {**describe_environment(), "processes": group.world_size},
                "records": records})
            if not config.keep_journal:
                shutil.rmtree(journal, ignore_errors=True)  # a finished run needs no resume point
        barrier(group)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def init_distributed(device: str | None) -> ProcessGroupInfo:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, NCCL on GPU)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return ProcessGroupInfo.current()


def default_rank_device(group: ProcessGroupInfo) -> str:
    import os

    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def barrier(group: ProcessGroupInfo) -> None:
    if group.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _skipped_records(cells, precision: str, reason: str) -> list[dict]:
    return [{"kind": "eval", "task": task.name, "setting": setting, "protocol": None, "precision": precision,
             "status": "skipped", "reason": reason} for task, setting in cells]


def _run_precision(config: EvalConfig, cells, precision: str, staging: Path, journal: Path,
                   group: ProcessGroupInfo) -> list[dict]:
    try:
        placement = resolve_placement(config.device, precision)
    except FromageInputError as err:
        if err.where.startswith("device="):
            raise
        return _skipped_records(cells, precision, str(err))
    torch.manual_seed(config.seed)
    try:
        with Stopwatch() as load_clock, MemoryTracker(placement.device) as load_memory:
            model = _load(config, placement, precision)
    except FromageInputError as err:
        if not err.where.startswith("precision="):  # a precision this family does not run: its cells are skipped
            raise
        return _skipped_records(cells, precision, str(err))
    load_cost = {"load_seconds": load_clock.seconds, "load_memory": load_memory.summary(),
                 "weight_bytes": model.weight_bytes}
    cache = FeatureCache(config.cache_dir, model.fingerprint) if config.cache_dir else None
    records = []
    for task, setting in cells:
        records += _run_cell(config, model, task, setting, precision, load_cost, cache, staging, journal, group)
    del model  # the records hold numbers only: this was the last reference
    release_memory()
    return records


def _load(config: EvalConfig, placement, precision: str):
    if config.clip is not None:
        return load_model(clip=config.clip, device=placement.device, precision=precision)
    fromage_options = dict(opt_version=config.opt_version, visual_model=config.visual_model,
                           retrieval_set=config.retrieval_set, random_init=config.random_init, seed=config.seed,
                           accept_foreign_retrieval_set=config.accept_foreign_retrieval_set)
    if model_family(config) == "clip":
        fromage_options = {k: v for k, v in fromage_options.items() if k in ("retrieval_set", "random_init") and v}
    return load_model(config.model_dir, device=placement.device, precision=precision, **fromage_options)


def _run_cell(config: EvalConfig, model, task, setting: str, precision: str, load_cost: dict, cache, staging: Path,
              journal: Path, group: ProcessGroupInfo) -> list[dict]:
    """One task x setting on a loaded model: its records, with what the run cost. Its own function so that
    the task's context (which holds the model) is gone when the caller frees the model."""
    torch.manual_seed(config.seed)
    protocols = parse_protocols(config.protocols, task)
    ctx = RunContext(model=model, data_root=config.data_root, limit=config.limit, cache=cache,
                     progress=config.progress and group.rank == 0, batch_size=config.batch_size,
                     option_batch_size=config.option_batch_size, image_workers=config.image_workers,
                     journal_dir=journal, task_key=f"{task.name}:{setting}:{config.limit}:{config.batch_size}",
                     work={}, timings={})
    model.counters.clear()
    cache_before = (cache.hits, cache.misses) if cache is not None else None
    with Stopwatch() as clock, MemoryTracker(model.placement.device) as memory:
        results = task.run_cell(ctx, setting, protocols)
    latency = cell_latency(ctx.timings)
    compute_seconds = sum(step["compute_seconds"] for step in latency["steps"].values())
    cost = {**load_cost, "wall_seconds": clock.seconds, "memory": memory.summary(), "latency": latency,
            **examples_rate(latency), "compute_seconds": compute_seconds,
            "throughput": throughput(model.counters, clock.seconds),
            "compute_throughput": throughput(ctx.compute_counters, compute_seconds),
            "work": {**dict(model.counters), **ctx.work, **_cache_work(cache, cache_before)}}
    cost = _gather_cost(cost, group)
    return [_record(result, precision, cost, staging) for result in results]


def _gather_cost(cost: dict, group: ProcessGroupInfo) -> dict:
    """Per-rank costs side by side (rank 0's at the top level), throughput summed over ranks."""
    if group.world_size == 1:
        return cost
    import torch.distributed as dist

    per_rank: list = [None] * group.world_size
    dist.all_gather_object(per_rank, cost)
    total = {}
    for c in per_rank:
        for name, rate in c["throughput"].items():
            total[name] = total.get(name, 0.0) + rate
    rates = [c["examples_per_second"] for c in per_rank if c["examples_per_second"] is not None]
    return {**cost, "processes": group.world_size, "throughput_all_ranks": total,
            # the ranks compute side by side: the group's rate is the sum of theirs
            "examples_per_second": sum(rates) if rates else None, "examples_per_second_over": "sum of the ranks' rates",
            "per_rank": [{k: c[k] for k in ("wall_seconds", "memory", "throughput", "work", "latency",
                                            "examples_per_second", "compute_seconds")}
                         for c in per_rank]}


def _cache_work(cache, before: tuple[int, int] | None) -> dict[str, int]:
    """The feature cache's hits and misses during the cell (images whose CLIP features were read back, or
    computed and stored); nothing without a cache."""
    if cache is None or before is None:
        return {}
    return {"feature_cache_hits": cache.hits - before[0], "feature_cache_misses": cache.misses - before[1]}


def _record(result: TaskResult, precision: str, cost: dict, staging: Path) -> dict:
    if result.status == "skipped":  # the model's family cannot do this cell: no metrics, no cost
        return {"kind": "eval", "task": result.task, "setting": result.setting, "protocol": result.protocol,
                "precision": precision, "status": "skipped", "reason": result.reason}
    name = f"{result.task}-{result.setting}-{result.protocol}-{precision}.jsonl"
    lines = "".join(json.dumps(p, default=str) + "\n" for p in result.predictions)
    atomic_write_text(staging / "predictions" / name, lines)
    n = result.n_examples
    record = {"kind": "eval", "task": result.task, "setting": result.setting, "protocol": result.protocol,
              "precision": precision, "status": "ok", "metrics": result.metrics, "paper": result.paper,
              "chance": result.chance,
              "n_examples": n, "n_skipped": result.skipped.total, "skipped": result.skipped.counts,
              "skipped_examples": result.skipped.examples, "extra": result.extra, "cost": cost,
              "predictions_file": f"predictions/{name}"}
    # from the predictions as written: what `compare` reads back is what the interval describes
    record["uncertainty"] = uncertainty(record, [json.loads(line) for line in lines.splitlines()])
    return record


def _add_drift(records: list[dict]) -> None:
    """Each lower-precision cell's metric deltas against the highest precision that ran in this invocation."""
    ran = {r["precision"] for r in records if r["status"] == "ok"}
    reference = next((p for p in PRECISION_ORDER if p in ran), None)
    by_key = {(r["task"], r["setting"], r["protocol"]): r for r in records
              if r["status"] == "ok" and r["precision"] == reference}
    for r in records:
        base = by_key.get((r["task"], r["setting"], r["protocol"]))
        if r["status"] != "ok" or base is None or r["precision"] == reference:
            continue
        r["drift"] = {"against": reference, **{m: v - base["metrics"][m] for m, v in r["metrics"].items()
                                              if m in base["metrics"] and _is_number(v) and _is_number(base["metrics"][m])}}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def list_tasks() -> list[dict]:
    return [{"name": t.name, "description": t.description, "settings": list(t.settings), "protocols": list(t.protocols),
             "files": t.files, "metrics": list(t.metrics),
             "paper": {f"{s}/{p}": v for (s, p), v in t.paper.items()}} for t in REGISTRY.values()]


def family_support() -> tuple[tuple[str, ...], list[tuple[str, dict[str, bool]]]]:
    """(families, [(task:setting, {family: runs?})]) from each task's `needs` and `model.family`'s capabilities."""
    from types import SimpleNamespace

    from model.family import FAMILIES, FAMILY_CAPABILITIES

    stand_ins = {f: SimpleNamespace(family=f, capabilities=FAMILY_CAPABILITIES[f]) for f in FAMILIES}
    rows = [(f"{t.name}:{s}", {f: t.unsupported(stand_ins[f], s) is None for f in FAMILIES})
            for t in REGISTRY.values() for s in t.settings]
    return FAMILIES, rows
