"""The profiler's timing windows: at least `repeats` timed calls and at least `min_seconds` of timed work per item,
whichever takes longer, summarised by median and interquartile range. A fake clock stands in for time, so nothing
here depends on how fast the machine is."""
import pytest
import torch

import fromage_bench.profiler as profiler
from fromage_bench.cli import main
from fromage_bench.profiler import ProfileConfig, _summary, time_it
from fromage_bench.results import read_results

CPU = torch.device("cpu")


class FakeClock:
    """A clock that only moves when the timed function runs: each call of `work` takes the next duration."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, iter(durations), 0

    def __call__(self) -> float:
        return self.now

    def work(self) -> None:
        self.calls += 1
        self.now += next(self.durations)


def test_fast_calls_run_until_the_timed_work_reaches_min_seconds():
    clock = FakeClock([0.125] * 100)  # binary-exact: 16 calls make 2.0 s
    times = time_it(clock.work, CPU, warmup=2, repeats=10, min_seconds=2.0, clock=clock)
    assert times == [0.125] * 16
    assert clock.calls == 2 + 16  # the warm-up calls ran and were not timed


def test_slow_calls_run_until_the_repeats_are_done():
    clock = FakeClock([0.5] * 100)
    times = time_it(clock.work, CPU, warmup=1, repeats=10, min_seconds=2.0, clock=clock)
    assert times == [0.5] * 10  # 2 s were reached after 4 calls; 10 repeats are the longer window
    assert clock.calls == 11


def test_warmup_time_does_not_count_and_the_window_stops_as_soon_as_both_are_met():
    clock = FakeClock([9.0, 9.0, 1.0, 0.25, 0.5, 0.25, 0.75, 0.25])
    times = time_it(clock.work, CPU, warmup=2, repeats=3, min_seconds=2.0, clock=clock)
    # cumulative timed work 1.0, 1.25, 1.75, 2.0: the fourth call meets 2 s (three repeats were met before)
    assert times == [1.0, 0.25, 0.5, 0.25]
    assert clock.calls == 6


def test_at_least_one_timed_call():
    clock = FakeClock([0.25] * 4)
    assert time_it(clock.work, CPU, warmup=0, repeats=0, min_seconds=0.0, clock=clock) == [0.25]


def test_cuda_windows_sum_the_event_times(monkeypatch):
    """On CUDA each call is timed by a pair of events (milliseconds); the window counts those times."""
    elapsed_ms = iter([400.0, 300.0, 700.0, 600.0, 100.0])
    synced = []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            pass

        def elapsed_time(self, end):
            return next(elapsed_ms)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    times = time_it(lambda: None, torch.device("cuda"), warmup=0, repeats=2, min_seconds=2.0)
    assert times == pytest.approx([0.4, 0.3, 0.7, 0.6])  # 2.0 s reached on the fourth call
    assert len(synced) == 4


def test_summary_median_and_interquartile_range_by_hand():
    # sorted 0.25 0.25 0.5 1.0: median (0.25 + 0.5) / 2; quartiles at positions 0.75 and 2.25 of 0..3,
    # interpolated linearly: q1 = 0.25, q3 = 0.5 + 0.25 * (1.0 - 0.5) = 0.625
    summary = _summary([1.0, 0.25, 0.5, 0.25])
    assert summary["median"] == pytest.approx(0.375)
    assert summary["q1"] == pytest.approx(0.25) and summary["q3"] == pytest.approx(0.625)
    assert summary["iqr"] == pytest.approx(0.375)
    assert (summary["min"], summary["max"], summary["n"]) == (0.25, 1.0, 4)
    assert summary["timed_seconds"] == pytest.approx(2.0)
    assert summary["all"] == [1.0, 0.25, 0.5, 0.25]
    # 1..10: positions 2.25 and 6.75 -> 3.25 and 7.75
    ten = _summary([float(v) for v in range(10, 0, -1)])
    assert (ten["median"], ten["q1"], ten["q3"], ten["iqr"]) == pytest.approx((5.5, 3.25, 7.75, 4.5))
    one = _summary([0.3])
    assert (one["median"], one["q1"], one["q3"], one["iqr"]) == (0.3, 0.3, 0.3, 0.0)


def test_default_window_is_ten_repeats_or_two_seconds():
    cfg = ProfileConfig(out=None)
    assert (cfg.warmup, cfg.repeats, cfg.min_seconds) == (2, 10, 2.0)


def test_the_cli_passes_its_window_to_every_item_and_records_the_summary(tiny_dir, tmp_path, monkeypatch):
    """--warmup/--repeats/--min-seconds reach the timer for each item (decode: both of its generate lengths);
    the records hold the median and IQR of the times the timer returned."""
    calls = []

    def fake_time_it(fn, device, warmup, repeats, min_seconds=0.0, clock=None):
        calls.append((warmup, repeats, min_seconds))
        return [0.004, 0.001, 0.002, 0.003]

    monkeypatch.setattr(profiler, "time_it", fake_time_it)
    out = tmp_path / "w"
    assert main(["profile", "--model-dir", str(tiny_dir), "--out", str(out), "--precisions", "fp32", "--device", "cpu",
                 "--scenarios", "retrieval,decode", "--pool-sizes", "100", "--decode-batch-sizes", "1",
                 "--new-tokens", "3", "--warmup", "1", "--repeats", "12", "--min-seconds", "0.5"]) == 0
    assert calls == [(1, 12, 0.5)] * 3  # retrieval, then decode's full and one-token generates
    retrieval, decode = read_results(out)["records"]
    seconds = retrieval["cost"]["seconds"]
    assert (seconds["median"], seconds["q1"], seconds["q3"]) == pytest.approx((0.0025, 0.00175, 0.00325))
    assert decode["cost"]["one_token_generate_seconds"]["iqr"] == pytest.approx(0.0015)
    assert decode["cost"]["seconds_per_token"] == pytest.approx(1e-9)  # equal medians: the floor
    assert read_results(out)["config"]["min_seconds"] == 0.5


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats: must be >= 1"),
    (["--warmup", "-1"], "--warmup: must be >= 0"),
    (["--min-seconds", "-1"], "--min-seconds: must be >= 0"),
    (["--min-seconds", "nan"], "--min-seconds: must be >= 0"),
])
def test_bad_window_arguments(tiny_dir, tmp_path, capsys, argv, message):
    assert main(["profile", "--model-dir", str(tiny_dir), "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
