"""`fromage-bench compare`: identical runs pass, planted regressions fail with exit 1."""
import copy
import json

import pytest

from fromage_bench.cli import main
from fromage_bench.compare import compare, parse_tolerance, run_compare
from fromage_bench.results import SCHEMA, SCHEMA_VERSION


# an environment block as describe_environment writes it (the fields compare.comparable reads)
ENV = {"cpu": "AMD EPYC", "cpu_count": 2, "usable_cpus": 2, "torch_threads": 2, "gpus": [],
       "cpu_info": {"model_name": "AMD EPYC", "vendor": "AuthenticAMD", "family": "25", "model": "17", "stepping": "1",
                    "instruction_sets": ["avx", "avx2", "avx512_bf16", "avx512f", "fma"], "source": "/proc/cpuinfo"},
       "packages": {"torch": "2.13.0+cpu", "transformers": "5.24.0", "bitsandbytes": "0.50.2"}}


def _doc():
    eval_record = {"kind": "eval", "task": "vist_retrieval", "setting": "5cap4img", "protocol": "paper",
                   "precision": "bf16", "status": "ok", "metrics": {"R@1": 20.0, "R@5": 40.0, "mean_rank": 12.0},
                   "cost": {"examples_per_second": 50.0, "weight_bytes": 1000, "memory": {"cpu_rss_bytes": 1e9}}}
    profile_record = {"kind": "profile", "scenario": "decode", "precision": "bf16", "status": "ok",
                      "params": {"batch_size": 1}, "cost": {"seconds": {"median": 0.010}, "weight_bytes": 1000}}
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "environment": copy.deepcopy(ENV),
            "records": [eval_record, profile_record]}


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
    assert main(["compare", str(base), str(base), "--report", "xml=out.xml"]) == 2
    assert "--report xml=out.xml: expected FORMAT=PATH" in capsys.readouterr().err


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


# -- the paired rule on runs with per-example predictions ------------------------------------------------
from xml.etree import ElementTree  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fromage_bench.results import write_results  # noqa: E402
from tasks.metrics import ranks_from_scores  # noqa: E402
from tasks.vist import story_metrics  # noqa: E402

def _story_scores(n_stories: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A VIST-like score matrix (stories x their 5 photos each) and each story's target column (anywhere in the
    pool: the tie rule favours low columns), quantised to 0.05 as a low-precision run's scores are: many ties."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_stories, 5 * n_stories, generator=g)
    targets = torch.randperm(5 * n_stories, generator=g)[:n_stories]
    scores[torch.arange(n_stories), targets] += 3.0
    return torch.round(scores * 20) / 20, targets


def _vist_run(tmp_path, name: str, scored: tuple[torch.Tensor, torch.Tensor], env: dict | None = None,
              eps: float = 50.0):
    """A run directory as `fromage-bench eval` writes it: results.json and the record's predictions."""
    scores, targets = scored
    ranks = ranks_from_scores(scores, targets)
    run = tmp_path / name
    (run / "predictions").mkdir(parents=True)
    lines = [json.dumps({"story_id": str(40000 + 5 * i), "target": str(int(t)), "rank": int(r)})
             for i, (t, r) in enumerate(zip(targets, ranks))]
    (run / "predictions" / "vist.jsonl").write_text("\n".join(lines) + "\n")
    record = {"kind": "eval", "task": "vist_retrieval", "setting": "5cap4img", "protocol": "corrected",
              "precision": "fp32", "status": "ok", "metrics": story_metrics(ranks), "n_examples": len(ranks),
              "predictions_file": "predictions/vist.jsonl",
              "cost": {"examples_per_second": eps, "examples_unit": "story", "weight_bytes": 1000}}
    write_results(run, {"environment": copy.deepcopy(env or ENV), "records": [record]})
    return run


def _unreachable(scored, stories) -> tuple[torch.Tensor, torch.Tensor]:
    """The run with the targets of `stories` scored -inf: they can no longer be retrieved."""
    scores, targets = scored
    broken = scores.clone()
    broken[stories, targets[stories]] = float("-inf")
    return broken, targets


def _rows(base, new, **kwargs):
    from fromage_bench.results import read_results

    return compare(read_results(base), read_results(new), base_dir=base, new_dir=new, **kwargs)


def test_planted_regression_ten_percent_unreachable_targets_is_flagged(tmp_path):
    scores = _story_scores(400)
    lost = torch.randperm(400, generator=torch.Generator().manual_seed(1))[:40]  # 10 % of the targets
    rows = _rows(_vist_run(tmp_path, "base", scores), _vist_run(tmp_path, "new", _unreachable(scores, lost)))
    metrics = {r.quantity: r for r in rows if r.quantity in ("R@1", "R@5", "R@10", "MRR", "mean_rank")}
    assert set(metrics) == {"R@1", "R@5", "R@10", "MRR", "mean_rank"}
    assert all(r.regressed and r.ci95 and "paired bootstrap over 400 stories" in r.note for r in metrics.values())
    low, high = metrics["R@10"].ci95
    assert high < -0.5 and low <= metrics["R@10"].new - metrics["R@10"].base <= high


def test_rerun_with_other_rounding_is_not_flagged(tmp_path):
    """The same 60 stories, scores perturbed below the quantisation step (ties broken otherwise, as another CPU
    rounds): the absolute rule flags most reruns (one story is 1.67 points), the paired rule almost none."""
    scores = _story_scores(60)
    base = _vist_run(tmp_path, "base", scores)
    flagged = {"paired": 0, "absolute": 0}
    reruns = 30
    for seed in range(reruns):
        g = torch.Generator().manual_seed(100 + seed)
        noisy = scores[0] + (torch.rand(scores[0].shape, generator=g) - 0.5) * 0.06, scores[1]
        new = _vist_run(tmp_path, f"new{seed}", noisy)
        assert (json.loads((new / "results.json").read_text())["records"][0]["metrics"]
                != json.loads((base / "results.json").read_text())["records"][0]["metrics"])
        for rule in flagged:
            flagged[rule] += any(r.regressed for r in _rows(base, new, rule=rule))
    assert flagged["absolute"] >= reruns // 2
    assert flagged["paired"] <= reruns // 10


def test_runs_without_predictions_fall_back_to_the_absolute_rule_and_say_so(tmp_path):
    scores = _story_scores(60)
    base, new = _vist_run(tmp_path, "base", scores), _vist_run(tmp_path, "new", scores)
    (base / "predictions" / "vist.jsonl").unlink()
    rows = [r for r in _rows(base, new) if r.quantity == "R@1"]
    assert rows[0].note == "absolute rule: no per-example predictions (BASE: predictions/vist.jsonl not found)"
    assert rows[0].ci95 is None and not rows[0].regressed
    code, text = run_compare(base / "results.json", new)  # a results.json path: its directory holds the predictions
    assert code == 0 and "absolute rule: no per-example predictions" in text
    (new / "predictions" / "vist.jsonl").write_text("{not json\n")
    assert main(["compare", str(base), str(new)]) == 2  # a damaged run is bad input, not a fallback


def test_partly_shared_examples_are_paired_over_the_shared_ones(tmp_path):
    scores = _story_scores(100)
    base, new = _vist_run(tmp_path, "base", scores), _vist_run(tmp_path, "new", (scores[0][:80], scores[1][:80]))
    row = next(r for r in _rows(base, new) if r.quantity == "R@1")
    assert row.note == "paired bootstrap over 80 shared stories of 100 / 80" and row.change.startswith("+0.000")


# -- comparable environments ----------------------------------------------------------------------------
def test_speed_is_compared_between_comparable_environments_only(tmp_path):
    scores = _story_scores(60)
    other = copy.deepcopy(ENV)
    other["cpu_info"]["instruction_sets"].remove("avx512_bf16")
    base = _vist_run(tmp_path, "base", scores)
    slow_same = _vist_run(tmp_path, "same", scores, eps=10.0)
    slow_other = _vist_run(tmp_path, "other", scores, eps=10.0, env=other)
    assert any(r.regressed and r.quantity.startswith("examples_per_second") for r in _rows(base, slow_same))
    rows = _rows(base, slow_other)
    speed = [r for r in rows if r.quantity.startswith("examples_per_second")]
    assert speed and all(r.verdict == "not comparable" and not r.regressed for r in speed)
    assert not any(r.regressed for r in rows)
    code, text = run_compare(base, slow_other)
    assert code == 0 and "CPU instruction sets: only BASE has avx512_bf16" in text
    assert any(r.regressed for r in _rows(base, slow_other, compare_speed_anyway=True))
    assert main(["compare", str(base), str(slow_other), "--compare-speed-anyway"]) == 1


def test_a_baseline_without_the_new_environment_fields_compares_metrics_not_speed(tmp_path):
    old_env = {k: v for k, v in ENV.items() if k not in ("cpu_info", "usable_cpus")}  # as committed before
    scores = _story_scores(400)
    broken = _unreachable(scores, torch.arange(40))
    base = _vist_run(tmp_path, "base", scores, env=old_env)
    rows = _rows(base, _vist_run(tmp_path, "new", broken, eps=1.0))
    assert all(r.verdict == "not comparable" for r in rows if r.quantity.startswith("examples_per_second"))
    assert any(r.regressed and r.quantity == "R@10" for r in rows)
    code, text = run_compare(base, _vist_run(tmp_path, "new2", scores, eps=1.0))
    assert code == 0 and "BASE records no CPU family / model / stepping / instruction sets" in text


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) "
     "Platinum 8480+\nstepping\t: 8\nflags\t\t: fpu sse4_2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 "
     "avx512_fp16\n\nprocessor\t: 1\nmodel name\t: other\n",
     {"model_name": "Intel(R) Xeon(R) Platinum 8480+", "vendor": "GenuineIntel", "family": "6", "model": "143",
      "stepping": "8", "instruction_sets": ["amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16",
                                            "avx512_fp16", "avx512f", "sse4_2"], "source": "/proc/cpuinfo"}),
])
def test_cpu_description_from_proc_cpuinfo_and_lscpu(cpuinfo, expected):
    from fromage_bench.environment import describe_cpu

    assert describe_cpu(cpuinfo=cpuinfo, lscpu="") == expected
    lscpu = ("Architecture:            x86_64\nVendor ID:               AuthenticAMD\n  Model name:            AMD EPYC "
             "9654\n    CPU family:          25\n    Model:               17\n    Stepping:            1\n"
             "    Flags:               fpu avx avx2 avx512f avx512_bf16\n")
    assert describe_cpu(cpuinfo="", lscpu=lscpu) == {
        "model_name": "AMD EPYC 9654", "vendor": "AuthenticAMD", "family": "25", "model": "17", "stepping": "1",
        "instruction_sets": ["avx", "avx2", "avx512_bf16", "avx512f"], "source": "lscpu"}


# -- CI-native output -----------------------------------------------------------------------------------
@pytest.fixture()
def regressed_pair(tmp_path):
    scores = _story_scores(400)
    broken = _unreachable(scores, torch.arange(40))
    return _vist_run(tmp_path, "base", scores), _vist_run(tmp_path, "new", broken)


def test_json_output_for_scripts(regressed_pair, tmp_path, capsys):
    base, new = regressed_pair
    assert main(["compare", str(base), str(new), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["exit_code"] == 1 and doc["regressions"] == sum(r["regressed"] for r in doc["rows"]) > 0
    assert doc["environment"] == {"comparable": True, "reasons": [], "speed_compared": True}
    r10 = next(r for r in doc["rows"] if r["quantity"] == "R@10")
    assert r10["verdict"] == "REGRESSED" and len(r10["ci95"]) == 2 and r10["ci95"][1] < -0.5


def test_junit_output_has_one_test_case_per_record(regressed_pair, tmp_path):
    base, new = regressed_pair
    out = tmp_path / "compare.xml"
    assert main(["compare", str(base), str(new), "--format", "junit", "--output", str(out)]) == 1
    root = ElementTree.parse(out).getroot()
    cases = root.findall("./testsuite/testcase")
    assert root.tag == "testsuites" and len(cases) == 1 and root.get("failures") == "1"
    assert cases[0].get("classname") == "vist_retrieval:5cap4img" and cases[0].get("name") == "[corrected] @fp32"
    assert "R@10" in cases[0].find("failure").get("message")
    assert main(["compare", str(base), str(base), "--format", "junit", "--output", str(out)]) == 0
    assert ElementTree.parse(out).getroot().find("./testsuite/testcase/failure") is None


def test_markdown_output_for_a_job_summary(regressed_pair, capsys):
    base, new = regressed_pair
    assert main(["compare", str(base), str(new), "--format", "markdown"]) == 1
    text = capsys.readouterr().out
    assert text.startswith("## fromage-bench compare: ❌") and "### Regressions" in text
    table = [line for line in text.splitlines() if line.startswith("| vist_retrieval")]
    rows = _rows(base, new)
    regressed = sum(r.regressed for r in rows)
    assert regressed and len(table) == regressed + len(rows)  # the regressions, then every row
    assert sum("REGRESSED" in line for line in table) == 2 * regressed
    assert all(line.count(" | ") == 6 for line in table)
    assert main(["compare", str(base), str(base), "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("## fromage-bench compare: ✅ 0 regression(s)")


def test_reproduce_records_of_two_models_are_compared_model_with_model():
    """A combined `reproduce` file holds one record per model for the same cell: CLIP is not paired with FROMAGe."""
    def combined(clip_r1: float, fromage_r1: float) -> dict:
        doc = _doc()
        clip, fromage = copy.deepcopy(doc["records"][0]), copy.deepcopy(doc["records"][0])
        clip.update(model="clip", metrics={"R@1": clip_r1})
        fromage.update(model="fromage", metrics={"R@1": fromage_r1})
        doc["records"] = [clip, fromage]
        return doc

    rows = compare(combined(2.0, 20.0), combined(2.0, 20.0), rule="absolute")
    assert rows and not any(r.regressed for r in rows)  # keyed by model: each equals its own
    rows = compare(combined(2.0, 20.0), combined(2.0, 10.0), rule="absolute")
    assert [r.key.split()[0] for r in rows if r.regressed] == ["fromage"]
