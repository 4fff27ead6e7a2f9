"""`fromage-bench compare`: identical runs pass, planted regressions fail with exit 1."""
import copy
import json

import pytest

from fromage_bench.cli import main
from fromage_bench.compare import compare, parse_tolerance
from fromage_bench.results import SCHEMA, SCHEMA_VERSION


def _doc():
    eval_record = {"kind": "eval", "task": "vist_retrieval", "setting": "5cap4img", "protocol": "paper",
                   "precision": "bf16", "status": "ok", "metrics": {"R@1": 20.0, "R@5": 40.0, "mean_rank": 12.0},
                   "cost": {"examples_per_second": 50.0, "weight_bytes": 1000, "memory": {"cpu_rss_bytes": 1e9}}}
    profile_record = {"kind": "profile", "scenario": "decode", "precision": "bf16", "status": "ok",
                      "params": {"batch_size": 1}, "cost": {"seconds": {"median": 0.010}, "weight_bytes": 1000}}
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "records": [eval_record, profile_record]}


def _write(tmp_path, name, doc):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(doc))
    return d


def test_identical_runs_pass(tmp_path, capsys):
    base, new = _write(tmp_path, "a", _doc()), _write(tmp_path, "b", _doc())
    assert main(["compare", str(base), str(new)]) == 0
    assert "0 regression(s)" in capsys.readouterr().out


@pytest.mark.parametrize("plant, quantity", [
    (lambda d: d["records"][0]["metrics"].update({"R@1": 19.4}), "R@1"),               # -0.6 points > 0.5
    (lambda d: d["records"][0]["metrics"].update({"mean_rank": 12.6}), "mean_rank"),   # lower is better
    (lambda d: d["records"][0]["cost"].update({"examples_per_second": 44.0}), "examples_per_second"),  # -12%
    (lambda d: d["records"][1]["cost"]["seconds"].update({"median": 0.0115}), "seconds.median"),      # +15%
    (lambda d: d["records"][0]["cost"]["memory"].update({"cpu_rss_bytes": 1.06e9}), "memory.cpu_rss_bytes"),
    (lambda d: d["records"][0]["cost"].update({"weight_bytes": 1100}), "weight_bytes"),
    (lambda d: d["records"].pop(1), "record"),
])
def test_planted_regressions_fail(tmp_path, capsys, plant, quantity):
    new_doc = copy.deepcopy(_doc())
    plant(new_doc)
    base, new = _write(tmp_path, "a", _doc()), _write(tmp_path, "b", new_doc)
    assert main(["compare", str(base), str(new)]) == 1
    out = capsys.readouterr().out
    assert any(quantity in line and "REGRESSED" in line for line in out.splitlines())


def test_within_tolerance_and_improvements_pass():
    new = copy.deepcopy(_doc())
    new["records"][0]["metrics"].update({"R@1": 19.6, "R@5": 45.0, "mean_rank": 10.0})  # -0.4, better, better
    new["records"][0]["cost"]["examples_per_second"] = 46.0  # -8% < 10%
    rows = compare(_doc(), new)
    assert not any(r.regressed for r in rows)
    assert not any(r.regressed for r in compare(_doc(), new, speed_tol=0.09, metric_tol=0.45))
    assert any(r.regressed for r in compare(_doc(), new, speed_tol=0.07))


def test_tolerance_parsing(capsys, tmp_path):
    assert parse_tolerance("10%", "speed-tol", percent=True) == pytest.approx(0.10)
    assert parse_tolerance("0.5", "metric-tol", percent=False) == 0.5
    base = _write(tmp_path, "a", _doc())
    assert main(["compare", str(base), str(base), "--speed-tol", "fast"]) == 2
    assert main(["compare", str(base), str(tmp_path / "missing")]) == 2
    assert "results file not found" in capsys.readouterr().err


def test_int8_timed_with_and_without_the_outlier_path_is_not_comparable():
    """A random-init int8 profile with planted outliers runs LLM.int8()'s outlier path; one without (or from before
    the option existed) does not: their speeds are other work, not a regression."""
    base, new = copy.deepcopy(_doc()), copy.deepcopy(_doc())
    base["records"][1]["int8_outliers"] = "none"
    new["records"][1].update({"int8_outliers": "planted", "cost": {"seconds": {"median": 0.020}, "weight_bytes": 1000}})
    rows = [r for r in compare(base, new) if r.key.startswith("profile")]
    assert [r.change for r in rows] == ["not comparable: int8_outliers none vs planted"]
    assert not any(r.regressed for r in rows)
    del base["records"][1]["int8_outliers"]
    assert [r.change for r in compare(base, new) if r.key.startswith("profile")] == [
        "not comparable: int8_outliers unrecorded vs planted"]
    new["records"][1]["int8_outliers"] = None  # the same on both sides: compared as before
    assert any(r.regressed for r in compare(base, new) if r.key.startswith("profile"))
