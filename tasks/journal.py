"""Per-example work that survives a kill and splits across processes.

`map_batches` cuts a task's examples into batches fixed by the example list alone (never by the number of
processes or by what is already done), so every example is always computed in the same company and its
result is bit-for-bit the same however the run is split or resumed. Each finished batch is appended to a
journal file of the process that computed it (one JSON line, flushed and fsynced), keyed by a hash of
(model fingerprint, task, setting, step, the batch's example ids). A rerun reads every journal file of that
key space, whatever the number of processes that wrote them, and computes only the missing batches; a line
torn by a kill is ignored. Under torch.distributed the missing batches are dealt round-robin to the ranks
and the results all-gathered, so every rank returns the full list in example order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessGroupInfo:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "ProcessGroupInfo":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


class Journal:
    def __init__(self, root: Path, namespace: str, rank: int = 0):
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / f"rank{rank}.jsonl"
        self.computed = 0  # batches this process computed (not read back)

    def load(self) -> dict[str, Any]:
        done: dict[str, Any] = {}
        for path in sorted(self.dir.glob("rank*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        done[entry["key"]] = entry["value"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line torn by a kill: that batch is recomputed
        return done

    def append(self, key: str, value: Any) -> None:
        line = (json.dumps({"key": key, "value": value}) + "\n").encode("utf-8")
        with open(self.file, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line torn by a kill: start on a fresh line
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.computed += 1


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def compute_halving_on_oom(compute: Callable[[list], list], batch: list, step: str) -> list:
    """compute(batch); on a CUDA out-of-memory error, free the cache and compute the two halves instead
    (recursively, down to single examples), logging each split. The journal still records the whole batch."""
    try:
        return list(compute(batch))
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning("%s: out of memory on a batch of %d, retrying as %d + %d", step, len(batch), half, len(batch) - half)
        return compute_halving_on_oom(compute, batch[:half], step) + compute_halving_on_oom(compute, batch[half:], step)


def map_batches(ctx, step: str, examples: Sequence, key: Callable[[Any], str],
                compute: Callable[[list], list], batch_size: int, desc: str | None = None, unit: str = "example",
                units: Callable[[Any], int] | None = None) -> list:
    """[compute(batch) results, flattened] in example order; `compute` returns one JSON-able value per
    example of its batch. Journalled and sharded as described in the module docstring. Only the compute
    call is timed (`ctx.timed`), each batch with its size in `unit` (`units(example)` per example, default 1):
    the JSON round trip and the journal's fsync are not."""
    batches = [list(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    sizes = [sum(units(e) for e in b) if units else len(b) for b in batches]
    namespace = _digest(getattr(ctx.model, "fingerprint", ""), ctx.task_key, step)
    keys = [_digest(namespace, *(key(e) for e in b)) for b in batches]
    group = ProcessGroupInfo.current()
    journal = Journal(ctx.journal_dir, namespace, group.rank) if ctx.journal_dir else None
    done = journal.load() if journal else {}
    if group.world_size > 1:
        dist.barrier()  # every rank has read the journal before any rank appends: all agree on what is missing
    todo = [i for i, k in enumerate(keys) if k not in done]
    mine = todo[group.rank::group.world_size]
    resumed = [i for i, k in enumerate(keys) if k in done]
    ctx.resumed(step, unit, len(resumed), sum(sizes[i] for i in resumed))
    fresh: dict[str, Any] = {}
    for i in ctx.track(mine, desc=desc or step, total=len(mine)):
        with ctx.timed(step, unit, sizes[i]):
            values = compute_halving_on_oom(compute, batches[i], step)
        if len(values) != len(batches[i]):
            raise RuntimeError(f"{step}: compute returned {len(values)} values for {len(batches[i])} examples")
        values = json.loads(json.dumps(values))  # exactly what a resumed run would read back
        fresh[keys[i]] = values
        if journal:
            journal.append(keys[i], values)
    if group.world_size > 1:
        gathered: list[dict] = [{} for _ in range(group.world_size)]
        dist.all_gather_object(gathered, fresh)
        for part in gathered:
            fresh.update(part)
    done.update(fresh)
    if ctx.work is not None:
        ctx.work["batches_computed"] = ctx.work.get("batches_computed", 0) + len(mine)
        ctx.work["batches_resumed"] = ctx.work.get("batches_resumed", 0) + len(batches) - len(todo)
    return [value for k in keys for value in done[k]]
