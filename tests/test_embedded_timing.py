"""The embedded run ends with a table of each stage's and each precision's wall time (issue 18)."""
from __future__ import annotations

from fromage_bench import embedded


def record(precision: str, wall: float, load: float, setting: str = "a", protocol: str = "paper") -> dict:
    return {"precision": precision, "status": "ok", "task": "t", "setting": setting, "protocol": protocol,
            "cost": {"wall_seconds": wall, "load_seconds": load}}


def test_precision_seconds_count_each_models_load_once_and_every_cell():
    records = [record("fp32", 1.5, 0.25), record("fp32", 2.0, 0.25, "b"), record("fp16", 4.0, 0.5),
               record("fp16", 4.0, 0.5, protocol="corrected"),  # computed with the paper record: counted once
               {"precision": "int8", "status": "skipped", "reason": "no bitsandbytes"}]
    assert embedded.precision_seconds(records) == {"fp32": 3.75, "fp16": 4.5, "int8": 0.0}


def test_the_summary_names_the_machine_and_lists_stages_cached_and_built_then_the_precisions():
    timings = {"data": (0.01, False), "standins": (200.0, True), "eval": (30.0, True)}
    text = embedded.time_summary(timings, {"fp32": 12.5, "bf16": 10.0}, {"cpu": "AMD EPYC", "cpu_count": 2})
    lines = text.splitlines()
    assert lines[0] == "[embedded] wall time by stage on AMD EPYC, 2 cores:"
    rows = [line.split() for line in lines[2:]]
    assert rows == [["data", "(cached)", "0.0"], ["standins", "200.0"], ["eval", "30.0"],
                    ["fp32", "(load", "+", "cells)", "12.5"], ["bf16", "(load", "+", "cells)", "10.0"],
                    ["total", "230.0"]]


def test_a_stage_records_its_time_and_whether_it_was_built(tmp_path):
    calls = []

    def build(out):
        out.mkdir(parents=True)
        calls.append(out)
        return 0

    timings: dict = {}
    embedded._stage(tmp_path, "data", ["--seed", "0"], build, timings)
    assert timings["data"][1] is True and timings["data"][0] >= 0
    embedded._stage(tmp_path, "data", ["--seed", "0"], build, timings)
    assert timings["data"][1] is False and len(calls) == 1  # cached: not run again
