"""Per-example work is resumable and shardable (tasks/journal.py): a torchrun run with 2 processes gives
exactly the single-process results, a run killed midway resumes from its journal to exactly the results
of an uninterrupted run, and `map_batches` itself reads, skips and orders journalled batches correctly."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fromage_bench.synth.captions import write_cc3m
from fromage_bench.synth.visdial import write_visdial
from fromage_bench.synth.vist import write_vist
from tasks.base import RunContext
from tasks.journal import Journal, map_batches
from tests.subprocesses import REPO, child_env, sigkill_when



# -- helpers --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_command(model_dir: Path, data_root: Path, out: Path, tasks: str, batch_size: int,
                 nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())] if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "fromage_bench", "eval", "--model-dir", str(model_dir), "--data-root", str(data_root),
            "--out", str(out), "--tasks", tasks, "--device", "cpu", "--no-progress", "--no-cache",
            "--precisions", "fp32", "--batch-size", str(batch_size)]


def run_to_completion(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    out = Path(cmd[cmd.index("--out") + 1])
    return json.loads((out / "results.json").read_text())


def predictions(out: Path, doc: dict) -> dict[str, bytes]:
    return {r["predictions_file"]: (out / r["predictions_file"]).read_bytes() for r in doc["records"]}


def metrics(doc: dict) -> dict[tuple, dict]:
    return {(r["task"], r["setting"], r["protocol"], r["precision"]): r["metrics"] for r in doc["records"]}


# -- 1. two processes == one process ----------------------------------------------------------------------
SHARDED_TASKS = "vist_retrieval:5cap4img,visdial_ranking,visdial_retrieval,image_text_retrieval:cc3m"


def test_two_processes_give_the_single_process_results_exactly(tiny_dir, tmp_path):
    data = tmp_path / "data"
    write_vist(data, n=7, seed=2, corrupt=1)
    write_visdial(data, n=5, seed=2, n_rounds=2, missing=[1])
    write_cc3m(data, n=9, seed=2, missing=1)
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    # batch size 2: odd batch counts, so the two ranks compute different numbers of batches
    one = run_to_completion(eval_command(tiny_dir, data, one_out, SHARDED_TASKS, batch_size=2))
    two = run_to_completion(eval_command(tiny_dir, data, two_out, SHARDED_TASKS, batch_size=2, nproc=2))

    assert two["environment"]["processes"] == 2
    assert len(one["records"]) == len(two["records"]) == 7
    assert metrics(two) == metrics(one)  # ==, to the last digit
    assert predictions(two_out, two) == predictions(one_out, one)
    for record in two["records"]:
        assert record["status"] == "ok" and record["n_examples"] > 0
        per_rank = [r["work"]["batches_computed"] for r in record["cost"]["per_rank"]]
        assert len(per_rank) == 2 and all(n > 0 for n in per_rank)  # both ranks did some of the work
        single = next(r for r in one["records"] if r["predictions_file"] == record["predictions_file"])
        assert sum(per_rank) == single["cost"]["work"]["batches_computed"]
    assert not (two_out / ".journal").exists() and not list(two_out.glob(".staging*"))


# -- 2. kill and resume -----------------------------------------------------------------------------------
RESUMED_TASKS = "visdial_ranking,vist_retrieval:1cap"


def _journal_lines(out: Path) -> int:
    """Complete lines in the run's journal files (0 before the journal exists)."""
    return sum(f.read_bytes().count(b"\n") for f in out.glob(".journal/*/rank*.jsonl"))


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_results(tiny_dir, tmp_path):
    data = tmp_path / "data"
    write_visdial(data, n=8, seed=3, n_rounds=5)  # 8 batches of one dialogue x 5 rounds x 2 protocols
    write_vist(data, n=6, seed=3)
    out, clean_out = tmp_path / "killed", tmp_path / "clean"
    cmd = eval_command(tiny_dir, data, out, RESUMED_TASKS, batch_size=1)

    sigkill_when(cmd, lambda: _journal_lines(out) >= 1, "any batch was journalled", timeout=120)
    assert not (out / "results.json").exists() and not (out / "predictions").exists()
    journalled = _journal_lines(out)
    assert journalled >= 1

    resumed = run_to_completion(cmd)
    clean = run_to_completion(eval_command(tiny_dir, data, clean_out, RESUMED_TASKS, batch_size=1))

    assert metrics(resumed) == metrics(clean)  # ==, to the last digit
    assert predictions(out, resumed) == predictions(clean_out, clean)
    total_resumed = 0
    for record in resumed["records"]:
        work = record["cost"]["work"]
        total = next(r for r in clean["records"] if r["predictions_file"] == record["predictions_file"])
        assert total["cost"]["work"]["batches_resumed"] == 0
        assert work["batches_computed"] + work["batches_resumed"] == total["cost"]["work"]["batches_computed"]
        total_resumed += work["batches_resumed"]
    ranking = [r for r in resumed["records"] if r["task"] == "visdial_ranking"]
    assert all(r["cost"]["work"]["batches_resumed"] > 0 for r in ranking)  # the first task was under way
    assert all(r["cost"]["work"]["batches_computed"] < 8 for r in ranking)  # so fewer batches were computed
    assert total_resumed > 0
    assert not (out / ".journal").exists()  # a finished run drops its resume point


# -- 3. map_batches itself --------------------------------------------------------------------------------
def fake_ctx(journal_dir: Path | None, task_key: str = "task:setting") -> RunContext:
    return RunContext(model=SimpleNamespace(fingerprint="fp"), data_root=Path("."), progress=False, task_key=task_key,
                      journal_dir=journal_dir, work={})


class Killed(Exception):
    pass


class Recorder:
    """compute(batch): one value per example (its square, and a float32 that must round-trip exactly)."""

    def __init__(self, fail_after: int | None = None):
        self.batches: list[list[int]] = []
        self.fail_after = fail_after

    def __call__(self, batch: list[int]) -> list:
        if self.fail_after is not None and len(self.batches) == self.fail_after:
            raise Killed()
        self.batches.append(list(batch))
        return [[x * x, float(torch.tensor(x / 7, dtype=torch.float32))] for x in batch]


EXAMPLES = list(range(10))
EXPECTED = [[x * x, float(torch.tensor(x / 7, dtype=torch.float32))] for x in EXAMPLES]


def _run(ctx, compute, batch_size=3):
    return map_batches(ctx, "step", EXAMPLES, key=str, compute=compute, batch_size=batch_size)


def test_map_batches_without_a_journal_computes_everything_in_order():
    compute = Recorder()
    ctx = fake_ctx(None)
    assert _run(ctx, compute) == EXPECTED
    assert compute.batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert ctx.work == {"batches_computed": 4, "batches_resumed": 0}


def test_journalled_batches_are_not_computed_again(tmp_path):
    first = Recorder(fail_after=2)  # "killed" during the third batch
    with pytest.raises(Killed):
        _run(fake_ctx(tmp_path), first)
    assert first.batches == [[0, 1, 2], [3, 4, 5]]

    second = Recorder()
    ctx = fake_ctx(tmp_path)
    assert _run(ctx, second) == EXPECTED
    assert second.batches == [[6, 7, 8], [9]]
    assert ctx.work == {"batches_computed": 2, "batches_resumed": 2}

    third = Recorder()
    ctx = fake_ctx(tmp_path)
    assert _run(ctx, third) == EXPECTED
    assert third.batches == [] and ctx.work == {"batches_computed": 0, "batches_resumed": 4}
    (journal,) = tmp_path.glob("*/rank0.jsonl")
    assert len(Journal(tmp_path, journal.parent.name).load()) == 4


def test_a_torn_last_line_is_ignored_and_recomputed(tmp_path):
    assert _run(fake_ctx(tmp_path), Recorder()) == EXPECTED
    (journal,) = tmp_path.glob("*/rank0.jsonl")
    lines = journal.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    journal.write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])  # killed while writing batch 4

    again = Recorder()
    ctx = fake_ctx(tmp_path)
    assert _run(ctx, again) == EXPECTED
    assert again.batches == [[9]]
    assert ctx.work == {"batches_computed": 1, "batches_resumed": 3}


def test_a_batch_recomputed_after_a_torn_line_is_journalled_durably(tmp_path):
    """The entry appended after a torn line must not be glued onto it (and lost on the next resume)."""
    assert _run(fake_ctx(tmp_path), Recorder()) == EXPECTED
    (journal,) = tmp_path.glob("*/rank0.jsonl")
    text = journal.read_text()
    journal.write_text(text[:-10])  # the last batch's line torn, no newline
    assert _run(fake_ctx(tmp_path), Recorder()) == EXPECTED
    after = Recorder()
    assert _run(fake_ctx(tmp_path), after) == EXPECTED
    assert after.batches == []


def test_batches_journalled_by_other_processes_are_read_and_results_stay_in_example_order(tmp_path):
    # an earlier 2-process run journalled batches 3 and 1 (in that order) in rank1's file before it was killed
    assert _run(fake_ctx(tmp_path), Recorder()) == EXPECTED
    (journal,) = tmp_path.glob("*/rank0.jsonl")
    lines = journal.read_text().splitlines(keepends=True)
    (journal.parent / "rank1.jsonl").write_text(lines[3] + lines[1])
    journal.unlink()

    compute = Recorder()
    ctx = fake_ctx(tmp_path)
    assert _run(ctx, compute) == EXPECTED
    assert compute.batches == [[0, 1, 2], [6, 7, 8]]
    assert ctx.work == {"batches_computed": 2, "batches_resumed": 2}


def test_journal_keys_depend_on_the_batch_the_step_and_the_task(tmp_path):
    assert _run(fake_ctx(tmp_path), Recorder(), batch_size=3) == EXPECTED
    other_batching = Recorder()
    assert _run(fake_ctx(tmp_path), other_batching, batch_size=4) == EXPECTED
    assert other_batching.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # not mixed with the size-3 batches
    other_task = Recorder()
    assert _run(fake_ctx(tmp_path, task_key="task:other"), other_task) == EXPECTED
    assert len(other_task.batches) == 4


def test_float32_and_infinite_values_round_trip_exactly(tmp_path):
    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    values[2, 3] = -float("inf")  # visdial_ranking's score of an option with no token to score

    def compute(batch):
        return [values[i].tolist() for i in batch]

    fresh = map_batches(fake_ctx(tmp_path), "floats", list(range(5)), key=str, compute=compute, batch_size=2)
    resumed = map_batches(fake_ctx(tmp_path), "floats", list(range(5)), key=str,
                          compute=lambda batch: pytest.fail("recomputed"), batch_size=2)
    for got in (fresh, resumed):
        assert torch.equal(torch.tensor(got, dtype=torch.float32), values)
