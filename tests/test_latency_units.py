"""Latency and throughput in `eval` (issue 20): each batch's compute time with its size and unit, percentiles
per batch and per unit with the warm-up batch apart, units that match what the tasks count, only the
compute call timed, rates over the examples computed in this run, and generated tokens counted computed
and kept apart on both decode paths. Times come from a fake clock: nothing here depends on how fast the
machine is."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fromage_bench.cli import main
from fromage_bench.compare import compare
from fromage_bench.synth.captions import write_cc3m
from fromage_bench.synth.visdial import write_visdial
from fromage_bench.synth.vist import write_vist
from fromage_bench.trackers import ALL_RESUMED, cell_latency, examples_rate, step_latency
from model.generation import newline_token_id
from tasks import REGISTRY
from tasks.base import RunContext
from tasks.journal import Journal, map_batches


class FakeClock:
    """perf_counter stand-in: time moves only when the test says so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fake_ctx(clock, journal_dir=None) -> RunContext:
    return RunContext(model=SimpleNamespace(fingerprint="fp", counters=Counter()), data_root=Path("."),
                      progress=False, journal_dir=journal_dir, task_key="t:s", work={}, timings={}, clock=clock)


class SlowCompute:
    """compute(batch): `per_example` seconds of fake work per example, one value per example."""

    def __init__(self, clock, per_example: float, fail_after: int | None = None):
        self.clock, self.per_example, self.fail_after, self.calls = clock, per_example, fail_after, 0

    def __call__(self, batch):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt  # killed mid-run
        self.calls += 1
        self.clock.advance(self.per_example * len(batch))
        return [x * 2 for x in batch]


# -- the percentiles, on hand-computed figures --------------------------------------------------------------
def test_warmup_apart_and_percentiles_per_batch_and_per_unit():
    out = step_latency("round", [4, 2, 4, 1], [2.0, 0.2, 0.8, 0.05], resumed_batches=3, resumed_units=12)
    assert out["unit"] == "round" and out["batches_computed"] == 4 and out["units_computed"] == 11
    assert out["batches_resumed"] == 3 and out["units_resumed"] == 12
    assert out["warmup"] == {"batch_size": 4, "batch_ms": 2000.0, "ms_per_unit": 500.0}
    steady = out["steady"]
    assert steady["batches"] == 3 and steady["units"] == 7 and steady["seconds"] == pytest.approx(1.05)
    # per batch: 200, 800, 50 ms -> sorted 50, 200, 800; linear interpolation: p90 at 1.8 -> 200 + 0.8 * 600
    assert steady["per_batch_ms"]["p50"] == pytest.approx(200.0)
    assert steady["per_batch_ms"]["p90"] == pytest.approx(680.0)
    assert steady["per_batch_ms"]["mean"] == pytest.approx(350.0) and steady["per_batch_ms"]["n"] == 3
    # per unit: 2 x 100, 4 x 200, 1 x 50 ms -> sorted 50, 100, 100, 200, 200, 200, 200
    assert steady["per_unit_ms"]["p50"] == pytest.approx(200.0) and steady["per_unit_ms"]["n"] == 7
    assert steady["per_unit_ms"]["mean"] == pytest.approx(1050.0 / 7)
    assert steady["units_per_second"] == pytest.approx(7 / 1.05)
    assert out["units_per_second"] == pytest.approx(11 / 3.05)  # every computed batch, warm-up included


def test_one_batch_is_warmup_only_and_no_batch_says_why():
    one = step_latency("story", [3], [0.3])
    assert one["steady"] is None and one["warmup"]["batch_ms"] == pytest.approx(300.0) and "warm-up" in one["note"]
    resumed = step_latency("story", [], [], resumed_batches=2, resumed_units=6)
    assert resumed["units_per_second"] is None and resumed["note"] == ALL_RESUMED


# -- map_batches: only the compute call is timed, with its size and unit ----------------------------------------
def test_only_the_compute_call_is_timed_not_the_journal_or_json(tmp_path, monkeypatch):
    clock = FakeClock()
    original_append = Journal.append

    def slow_append(self, key, value):  # a journal fsync that takes 5 s
        clock.advance(5.0)
        original_append(self, key, value)

    monkeypatch.setattr(Journal, "append", slow_append)
    original_dumps = json.dumps

    def slow_dumps(*args, **kwargs):  # and a JSON round trip that takes 1 s
        clock.advance(1.0)
        return original_dumps(*args, **kwargs)

    monkeypatch.setattr("tasks.journal.json.dumps", slow_dumps)
    ctx = fake_ctx(clock, tmp_path)
    assert map_batches(ctx, "step", list(range(7)), str, SlowCompute(clock, 0.25), batch_size=3) == [
        0, 2, 4, 6, 8, 10, 12]
    times = ctx.timings["step"]
    assert times.unit == "example" and times.sizes == [3, 3, 1]
    assert times.seconds == pytest.approx([0.75, 0.75, 0.25])


def test_units_per_example_count_what_the_task_counts():
    clock = FakeClock()
    ctx = fake_ctx(clock)
    dialogues = [SimpleNamespace(rounds=(1,) * n) for n in (10, 7, 3)]
    compute = lambda batch: clock.advance(0.1 * sum(len(d.rounds) for d in batch)) or [0] * len(batch)  # noqa: E731
    map_batches(ctx, "rounds", dialogues, lambda d: str(id(d)), compute, batch_size=1, unit="round",
                units=lambda d: len(d.rounds))
    times = ctx.timings["rounds"]
    assert times.unit == "round" and times.sizes == [10, 7, 3]
    latency = cell_latency(ctx.timings)
    step = latency["steps"]["rounds"]
    assert step["steady"]["per_unit_ms"]["p50"] == pytest.approx(100.0)  # 0.1 s a round, whatever the dialogue
    assert examples_rate(latency)["examples_per_second"] == pytest.approx(10.0)
    assert examples_rate(latency)["examples_unit"] == "round"


def test_a_resumed_run_rates_only_the_batches_it_computed(tmp_path):
    clock = FakeClock()
    examples = list(range(10))
    with pytest.raises(KeyboardInterrupt):  # killed during the third batch
        map_batches(fake_ctx(clock, tmp_path), "s", examples, str, SlowCompute(clock, 0.5, fail_after=2), 3)

    ctx = fake_ctx(clock, tmp_path)
    assert map_batches(ctx, "s", examples, str, SlowCompute(clock, 0.1), 3) == [2 * x for x in examples]
    latency = cell_latency(ctx.timings)
    step = latency["steps"]["s"]
    assert (step["batches_computed"], step["units_computed"]) == (2, 4)  # [6, 7, 8] and [9]
    assert (step["batches_resumed"], step["units_resumed"]) == (2, 6)
    rate = examples_rate(latency)
    assert rate["examples_per_second"] == pytest.approx(4 / 0.4)  # not 10 examples over the time of 4
    assert rate["steady_examples_per_second"] == pytest.approx(1 / 0.1)

    again = fake_ctx(clock, tmp_path)
    map_batches(again, "s", examples, str, SlowCompute(clock, 0.1), 3)
    rate = examples_rate(cell_latency(again.timings))
    assert rate["examples_per_second"] is None and rate["examples_per_second_note"] == ALL_RESUMED


# -- every task's unit matches what it counts ---------------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_vist(root, n=4, seed=2)
    write_visdial(root, n=3, seed=2, n_rounds=4)
    write_cc3m(root, n=5, seed=2)
    return root


@pytest.mark.parametrize("task, setting, unit", [
    ("visdial_ranking", "val", "round"), ("visdial_retrieval", "val", "dialogue"), ("vist_retrieval", "5cap", "story"),
    ("image_text_retrieval", "cc3m", "caption"), ("captioning", "cc3m", "image")])
def test_each_task_times_the_unit_it_counts(tiny, data_root, task, setting, unit):
    clock = FakeClock()
    ctx = RunContext(model=tiny, data_root=data_root, progress=False, batch_size=2, timings={}, work={}, clock=clock)
    results = REGISTRY[task].run(ctx, setting, REGISTRY[task].protocols)
    (times,) = ctx.timings.values()
    assert times.unit == unit
    counted = results[0].n_examples if task != "image_text_retrieval" else results[0].extra["n_captions"]
    assert sum(times.sizes) == counted
    if task == "visdial_ranking":  # one dialogue per batch, counted in rounds
        assert times.sizes == [4] * results[0].extra["dialogues"]


# -- eval end to end: a fully resumed cell says so, and compare / the report take old and new files ----------
def test_a_fully_resumed_eval_cell_has_no_rate_and_says_why(tiny_dir, data_root, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--model-dir", str(tiny_dir), "--data-root", str(data_root), "--out", str(out), "--tasks",
            "visdial_retrieval", "--precisions", "fp32", "--device", "cpu", "--no-progress", "--no-cache",
            "--keep-journal", "--batch-size", "2"]
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())["records"][0]["cost"]
    assert first["examples_unit"] == "dialogue" and first["examples_per_second"] > 0
    assert main(args) == 0  # the journal holds every batch now
    doc = json.loads((out / "results.json").read_text())
    cost = doc["records"][0]["cost"]
    assert cost["examples_per_second"] is None and cost["examples_per_second_note"] == ALL_RESUMED
    step = cost["latency"]["steps"][cost["latency"]["headline"]]
    assert step["batches_computed"] == 0 and step["units_resumed"] == 3
    assert "all resumed" in (out / "report.html").read_text()
    old = {"records": [{**r, "cost": {k: v for k, v in r["cost"].items() if k != "examples_unit"}}
                       for r in doc["records"]]}
    for r in old["records"]:
        r["cost"]["examples_per_second"] = 3.0  # an old file: examples over the wall time, no unit
    new = json.loads(json.dumps(doc))
    for r in new["records"]:
        r["cost"]["examples_per_second"] = 1.0
    rows = compare(old, new)
    speed = [row for row in rows if row.quantity.startswith("examples_per_second")]
    assert speed and all(row.change == "not comparable" and not row.regressed for row in speed)


# -- generated tokens: computed and kept apart on both decode paths -------------------------------------------
@pytest.fixture(scope="module")
def newline_prone(tiny_dir):
    """The tiny model with the newline's output row scaled up, so that greedy answers end at different steps."""
    from model import load_fromage

    torch.manual_seed(0)
    model = load_fromage(tiny_dir, device="cpu", precision="fp32")
    newline = newline_token_id(model.model)
    with torch.no_grad():
        model.model.lm.lm_head.weight[newline] *= 30.0
    return model


PROMPTS = ["A red", "Q: what colour?\nA:", "one two three four", "hello", "x y"]


def _first_newlines(token_ids: torch.Tensor, newline: int, n: int) -> list[int]:
    out = []
    for row in token_ids.tolist():
        out.append(row.index(newline) if newline in row[:n] else n)
    return out


def test_static_path_computes_past_the_newline_and_keeps_the_same_tokens_as_dynamic(newline_prone):
    model, n = newline_prone, 12
    newline = newline_token_id(model.model)
    prompts = [[p] for p in PROMPTS]
    model.counters.clear()
    static = model.generate(prompts, n, stop_at_newline=True, decode="static")
    static_counts = dict(model.counters)
    model.counters.clear()
    dynamic = model.generate(prompts, n, stop_at_newline=True, decode="dynamic")
    dynamic_counts = dict(model.counters)

    stops = _first_newlines(static.token_ids, newline, n)  # where each greedy answer ends
    assert len(set(stops)) > 1 and max(stops) + 1 < n  # answers that end at different steps, all early
    kept = sum(stops)
    steps_dynamic = min(n, max(s + 1 for s in stops))  # the dynamic loop stops once every row has its newline
    assert static_counts["tokens_generated_computed"] == len(PROMPTS) * n
    assert static_counts["tokens_generated_kept"] == kept
    assert dynamic_counts["tokens_generated_computed"] == len(PROMPTS) * steps_dynamic
    assert dynamic_counts["tokens_generated_kept"] == kept
    assert static.tokens_kept == dynamic.tokens_kept == kept
