"""What every task is: a small declarative unit (name, settings, protocols, files, metrics, paper numbers)
plus a `run` that turns a model and a data root into one `TaskResult` per setting x protocol."""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from model.errors import FromageInputError
from model.family import IMAGE_RETRIEVAL, missing_capability
from model.images import CROP


@dataclass
class Skipped:
    """Examples left out because of per-example data faults (missing/corrupt image, ...), by reason."""
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # first few, for the report

    def add(self, reason: str, example_id: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if example_id and len(self.examples) < 20:
            self.examples.append(f"{example_id}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class TaskResult:
    """One record of results.json: a task x setting x protocol (the runner adds precision and timings)."""
    task: str
    setting: str
    protocol: str
    metrics: dict[str, float]
    n_examples: int
    skipped: Skipped
    paper: dict[str, float] | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)  # one JSON-able dict per example
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"            # "skipped": the model's family cannot do this cell (`reason` says why)
    reason: str | None = None
    chance: dict[str, float] = field(default_factory=dict)  # metric -> its level for a random ranking (tasks.chance)


@dataclass
class StepTimes:
    """One `map_batches` step of a cell: the compute time of each batch computed in this run with its size
    (in `unit`: dialogue, round, story, caption, image), and what was resumed from the journal instead."""
    unit: str
    sizes: list[int] = field(default_factory=list)      # units per computed batch, in the order computed
    seconds: list[float] = field(default_factory=list)  # compute seconds per computed batch
    resumed_batches: int = 0
    resumed_units: int = 0


def _synchronize(device) -> None:
    """Wait for the device's queued work, so that a clock reading covers the work launched before it."""
    if torch.cuda.is_available() and getattr(device, "type", "cuda") == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RunContext:
    """Where a task runs: the model, the data, and the harness services it may use."""
    model: Any                     # a model.family.TaskModel (model.Fromage, model.clip_baseline.ClipBaseline, ...)
    data_root: Path
    limit: int | None = None       # first N examples (stories, dialogues, captions)
    cache: Any = None              # tasks.cache.FeatureCache or None
    progress: bool = True
    batch_size: int = 16
    option_batch_size: int = 100          # VisDial answer options per scoring pass (a round's 100: one pass)
    image_workers: int | None = None      # DataLoader processes decoding image files (None: see default_workers)
    journal_dir: Path | None = None       # where per-batch results are journalled (resume); None: no journal
    task_key: str = ""                    # task/setting, part of the journal keys
    work: dict | None = None              # counters of batches computed / resumed, reported in the results
    timings: dict[str, StepTimes] | None = None  # step -> its batch times, filled by `timed` (None: not kept)
    compute_counters: Counter = field(default_factory=Counter)  # the model's work counters inside `timed`
    clock: Callable[[], float] = time.perf_counter  # seconds; tests pass a fake one

    def map_batches(self, step: str, examples, key, compute, batch_size: int | None = None, desc: str | None = None,
                    unit: str = "example", units: Callable[[Any], int] | None = None):
        """Per-example results, resumable and sharded across processes: see tasks/journal.py. `unit` names what
        the task counts (a batch of dialogues may count rounds: `units(example)` of them per example)."""
        from .journal import map_batches

        return map_batches(self, step, examples, key, compute, batch_size or self.batch_size, desc, unit, units)

    def track(self, iterable: Iterable, desc: str | None = None, total: int | None = None) -> Iterator:
        """Iterate with a progress bar (nothing is timed here: see `timed`)."""
        yield from tqdm(iterable, desc=desc, total=total, disable=not self.progress, leave=False, dynamic_ncols=True)

    @contextmanager
    def timed(self, step: str, unit: str, size: int):
        """Time the block (a batch's compute call, `size` units) from a synchronised device to a synchronised
        device, and count the model's work inside it; recorded under `step` only if the block finishes."""
        device = getattr(getattr(self.model, "placement", None), "device", None)
        counters = getattr(self.model, "counters", None)
        before = Counter(counters) if counters is not None else None
        _synchronize(device)
        start = self.clock()
        yield
        _synchronize(device)
        seconds = self.clock() - start
        if self.timings is not None:
            times = self.timings.setdefault(step, StepTimes(unit))
            times.sizes.append(size)
            times.seconds.append(seconds)
        if before is not None:
            self.compute_counters.update(Counter(counters) - before)

    def resumed(self, step: str, unit: str, batches: int, units: int) -> None:
        """Count batches read back from the journal instead of computed in this run (batches other ranks compute
        now are neither: they are in those ranks' figures)."""
        if self.timings is not None:
            times = self.timings.setdefault(step, StepTimes(unit))
            times.resumed_batches += batches
            times.resumed_units += units


@dataclass
class Task:
    name: str
    description: str
    settings: tuple[str, ...]
    protocols: tuple[str, ...]
    files: dict[str, str]  # role (or "setting/role" when settings read different data) -> default path under --data-root
    metrics: tuple[str, ...]
    paper: dict[tuple[str, str], dict[str, float]]  # (setting, protocol) -> the paper's numbers, where it has them
    run: Callable[[RunContext, str, tuple[str, ...]], list[TaskResult]]
    default_setting: str | None = None
    # protocol -> image preprocessing (`model.images`) where it is not "crop", the API's and training's: the
    # original VIST / VisDial scripts squash, so their `paper` protocols do
    preprocess: dict[str, str] = field(default_factory=dict)
    # capabilities (`model.family`) a model needs for a setting ("*": every setting); a family without them
    # gets a skipped cell with the reason
    needs: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"*": (IMAGE_RETRIEVAL,)})
    # family -> (setting, protocol) -> the paper's numbers for that family (e.g. its CLIP ViT-L/14 rows); `paper`
    # holds FROMAGe's
    family_paper: dict[str, dict[tuple[str, str], dict[str, float]]] = field(default_factory=dict)

    def preprocessing(self, protocol: str) -> str:
        return self.preprocess.get(protocol, CROP)

    def unsupported(self, model, setting: str) -> str | None:
        """Why `model`'s family cannot run this setting, or None."""
        for capability in (*self.needs.get("*", ()), *self.needs.get(setting, ())):
            reason = missing_capability(model, capability, f"{self.name}:{setting}")
            if reason:
                return reason
        return None

    def run_cell(self, ctx: RunContext, setting: str, protocols: tuple[str, ...]) -> list[TaskResult]:
        """`run`, or one skipped result per protocol when the model's family lacks what the setting needs."""
        reason = self.unsupported(ctx.model, setting)
        if reason is None:
            return self.run(ctx, setting, protocols)
        return [TaskResult(task=self.name, setting=setting, protocol=protocol, metrics={}, n_examples=0,
                           skipped=Skipped(), status="skipped", reason=reason) for protocol in protocols]

    def paper_numbers(self, setting: str, protocol: str, family: str = "fromage") -> dict[str, float] | None:
        """The paper's numbers for this cell and model family, where it has them."""
        table = self.paper if family == "fromage" else self.family_paper.get(family, {})
        numbers = table.get((setting, protocol))
        return dict(numbers) if numbers is not None else None

    def path(self, ctx: RunContext, role: str, setting: str | None = None) -> Path:
        key = f"{setting}/{role}" if setting and f"{setting}/{role}" in self.files else role
        return ctx.data_root / self.files[key]

    def check_files(self, data_root: Path, setting: str | None = None) -> None:
        """Fail fast, before any model work, naming the first missing file."""
        for role, rel in self.files.items():
            if "/" in role and setting is not None and not role.startswith(f"{setting}/"):
                continue
            path = data_root / rel
            if not path.exists():
                raise FromageInputError(path, f"missing ({self.name} needs its {role} here)",
                                        f"see `fromage-bench tasks` for the expected layout under --data-root")

    def result(self, setting: str, protocol: str, family: str = "fromage", **fields) -> TaskResult:
        """This task's result for one setting x protocol, with the paper's numbers for it (for the model's
        `family`) where it has them."""
        extra = {"image_preprocessing": self.preprocessing(protocol), **fields.pop("extra", {})}
        return TaskResult(task=self.name, setting=setting, protocol=protocol,
                          paper=self.paper_numbers(setting, protocol, family), extra=extra, **fields)

    def results(self, setting: str, protocols: tuple[str, ...], *, metrics: dict, n_examples: int, skipped: Skipped,
                predictions: list, extra: dict, family: str = "fromage", chance: dict | None = None
                ) -> list[TaskResult]:
        """One result per protocol, for tasks whose protocols share one computation."""
        return [self.result(setting, protocol, family, metrics=dict(metrics), n_examples=n_examples, skipped=skipped,
                            predictions=predictions, extra=dict(extra), chance=dict(chance or {}))
                for protocol in protocols]


REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in REGISTRY:
        raise FromageInputError(f"task {name!r}", "unknown task", f"valid tasks: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def parse_task_spec(spec: str) -> list[tuple[Task, str]]:
    """'vist_retrieval:5cap4img,visdial_ranking' -> [(task, setting), ...]; no setting = all settings."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, setting = item.partition(":")
        task = get_task(name)
        if setting and setting not in task.settings:
            raise FromageInputError(f"task {item!r}", f"unknown setting {setting!r} of {name}",
                                    f"valid settings: {', '.join(task.settings)}")
        out += [(task, s) for s in ([setting] if setting else task.settings)]
    if not out:
        raise FromageInputError("--tasks", "no task given", f"valid tasks: {', '.join(sorted(REGISTRY))}")
    return out


def parse_protocols(spec: str | None, task: Task) -> tuple[str, ...]:
    if spec is None:
        return task.protocols
    wanted = tuple(p.strip() for p in spec.split(",") if p.strip())
    for p in wanted:
        if p not in ("paper", "corrected"):
            raise FromageInputError(f"--protocol {p!r}", "unknown protocol", "valid protocols: paper, corrected")
    return tuple(p for p in wanted if p in task.protocols) or task.protocols[:1]


def limited(items: Iterable, limit: int | None) -> list:
    items = list(items)
    return items if limit is None else items[:limit]
