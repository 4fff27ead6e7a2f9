"""`fromage-bench reproduce` (fromage_bench/reproduce.py): tables.md / tables.csv in the paper's layout from
hand-made records, whether the data is the paper's, models whose run finished are not rerun, a model that cannot be
loaded is one error line with no tables, the embedded default's models, and a killed reproduce resumes."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fromage_bench import reproduce
from fromage_bench.cli import main
from fromage_bench.results import write_results
from fromage_bench.synth.visdial import write_visdial
from fromage_bench.synth.vist import write_vist
from tests.subprocesses import REPO, child_env, sigkill_when
from tests.test_report import CLIP_SKIP, make_reproduce_document, write_miniworld_root


# -- tables.md / tables.csv from hand-made records ---------------------------------------------------------------
@pytest.fixture
def tables(tmp_path):
    document = make_reproduce_document(write_miniworld_root(tmp_path / "data"))
    md, csv_path = reproduce.write_tables(tmp_path, document)
    return md.read_text(encoding="utf-8"), csv_path.read_text(encoding="utf-8")


def test_tables_md_in_the_papers_layout(tables):
    md, _ = tables
    lines = md.splitlines()
    assert lines[0] == "# The paper's tables, reproduced"
    assert "not the paper's" in lines[2] and "miniworld" in lines[2]
    assert [l for l in lines if l.startswith("## ")] == [
        "## Table 1: VIST contextual image retrieval", "## Table 2: VisDial image retrieval",
        "## Table 2: VisDial answer ranking"]
    assert ("| Model | Setting | R@1 (p) | R@1 (c) | R@1 paper | R@5 (p) | R@5 (c) | R@5 paper | R@10 (p) | R@10 (c) "
            "| R@10 paper | Note |") in lines
    # by hand: ours from the records, the paper's from the FROMAGe paper's Table 1 (CLIP 2.4/21.3/34.0, FROMAGe
    # 18.2/42.7/51.8 on 5 captions + 4 images), ± the record's bootstrap standard error
    assert "| CLIP | 5cap4img | 7.00 | 8.00 | 2.40 | 22.00 | 23.00 | 21.30 | 32.00 | 33.00 | 34.00 |  |" in lines
    assert ("| FROMAGe | 5cap4img | 12.00 \u00b1 1.25 | 13.50 | 18.20 | 42.00 \u00b1 2.50 | 43.50 | 42.70 | 62.00 "
            "| 63.50 | 51.80 |  |") in lines
    assert ("| chance (random ranking) | 5cap4img | 7.14 | 7.14 | \u2014 | 35.71 | 35.71 | \u2014 | 71.43 | 71.43 "
            "| \u2014 |  |") in lines
    # VisDial IR: CLIP 17.7/38.9/50.2 and FROMAGe 20.8/44.9/56.0 in the paper
    assert "| CLIP | val | 25.00 | 50.00 | 17.70 | 75.00 | 75.00 | 38.90 | 100.00 | 100.00 | 50.20 |  |" in lines
    # answer ranking: the reference notebook's 16.594 / 21.997 / 17.573 / 19.971 / 24.414; CLIP skipped with its reason
    assert ("| FROMAGe | val | 8.50 | 14.75 | 16.59 | 11.25 | 3.50 | 22.00 | 2.50 | 0.00 | 17.57 | 12.50 | 5.00 "
            "| 19.97 | 37.50 | 12.50 | 24.41 |  |") in lines
    assert ("| CLIP | val | " + " | ".join(["skipped", "skipped", "\u2014"] * 5) + f" | skipped: {CLIP_SKIP} |") in lines
    # row order: model rows of a setting (CLIP first, as the paper), then its chance row
    table1 = [l.split(" | ")[0][2:] + "/" + l.split(" | ")[1] for l in lines
              if l.startswith("| ") and ("1cap" in l or "5cap" in l)]
    assert table1 == ["CLIP/1cap", "FROMAGe/1cap", "chance (random ranking)/1cap", "CLIP/5cap", "FROMAGe/5cap",
                      "chance (random ranking)/5cap", "CLIP/5cap4img", "FROMAGe/5cap4img",
                      "chance (random ranking)/5cap4img"]


def test_tables_csv_has_the_same_rows_at_full_precision(tables):
    _, text = tables
    blocks = [b for b in text.split("table,model,") if b]
    assert len(blocks) == 3  # one header per table
    rows = {}
    for block in blocks:
        for row in csv.DictReader(io.StringIO("table,model," + block)):
            rows[(row["table"], row["label"] or row["kind"], row["setting"])] = row
    clip = rows[("table1", "clip", "5cap4img")]
    assert float(clip["R@1 ours (paper protocol)"]) == 7.0 and float(clip["R@1 ours (corrected)"]) == 8.0
    assert float(clip["R@1 paper"]) == 2.4 and float(clip["R@10 paper"]) == 34.0
    assert clip["precision"] == "fp32" and clip["kind"] == "model" and clip["R@1 ours (paper protocol) stderr"] == ""
    fromage = rows[("table1", "fromage", "5cap4img")]
    assert float(fromage["R@1 ours (paper protocol) stderr"]) == 1.25
    chance = rows[("table1", "chance", "1cap")]
    assert float(chance["R@1 ours (paper protocol)"]) == pytest.approx(100 / 14, abs=1e-12)  # not rounded
    assert chance["R@1 paper"] == "" and chance["label"] == ""
    ranking = rows[("table2_ranking", "clip", "val")]
    assert ranking["NDCG ours (paper protocol)"] == "skipped" and ranking["note"] == f"skipped: {CLIP_SKIP}"
    assert float(rows[("table2_ranking", "fromage", "val")]["NDCG paper"]) == 16.594


# -- whose data ------------------------------------------------------------------------------------------------
def _visdial_record(dialogues: int, skipped: int = 0) -> dict:
    return {"kind": "eval", "task": "visdial_retrieval", "status": "ok", "extra": {"pool_size": dialogues - skipped},
            "n_skipped": skipped}


def test_paper_data_verdicts(tmp_path):
    miniworld = write_miniworld_root(tmp_path / "mini")
    real = tmp_path / "real"
    real.mkdir()
    verdict = reproduce.paper_data
    assert verdict({"config": {"data_root": str(miniworld)}, "records": []}) == (
        False, f"the miniworld ({miniworld / 'miniworld' / 'manifest.json'})")
    assert verdict({"config": {"data_root": str(real), "limit": 5}, "records": []})[0] is False
    assert verdict({"config": {"data_root": str(real)}, "records": [_visdial_record(40)]})[0] is False
    assert verdict({"config": {"data_root": str(real)}, "records": [_visdial_record(2064, skipped=3)]})[0] is True
    assert verdict({"config": {"data_root": str(real)}, "records": []})[0] is True  # VIST only, on a real root
    assert verdict({"config": {"data_root": str(tmp_path / "gone")}, "records": []})[0] is False  # unknown
    assert verdict({"data": {"paper_data": True, "why": "said so"}}) == (True, "said so")


# -- running: reuse, bad models, the embedded default ----------------------------------------------------------
def _fake_runner(document: dict, calls: list):
    """A stand-in for runner.run_eval: writes the model's hand-made records into its run directory."""
    def run_eval(config):
        calls.append(config.out.name)
        config.out.mkdir(parents=True, exist_ok=True)
        label = config.out.name
        records = [dict(r) for r in document["records"] if r.get("model") == label]
        for r in records:
            r.pop("model")
        from fromage_bench.runner import model_entry

        model = {**document["models"][label], "source_state": model_entry(config)["source_state"]}  # as run_eval
        write_results(config.out, {"created": "now", "config": config.to_json(), "environment": {},
                                   "model": model, "records": records})
        return config.out / "results.json"
    return run_eval


def test_finished_models_are_not_rerun(tmp_path):
    data = write_miniworld_root(tmp_path / "data")
    document = make_reproduce_document(data)
    (tmp_path / "clip").mkdir()  # what family detection looks at: a CLIP config, a FROMAGe model_args.json
    (tmp_path / "clip" / "config.json").write_text('{"model_type": "clip"}')
    (tmp_path / "fromage").mkdir()
    (tmp_path / "fromage" / "model_args.json").write_text("{}")
    models = [reproduce.ModelSpec("clip", "clip", str(tmp_path / "clip"), "CLIP"),
              reproduce.ModelSpec("fromage", "fromage", str(tmp_path / "fromage"), "FROMAGe")]
    config = reproduce.ReproduceConfig(out=tmp_path / "out", data_root=data, models=models, device="cpu")
    calls: list = []
    path = reproduce.run_reproduce(config, _fake_runner(document, calls))
    assert calls == ["clip", "fromage"]
    combined = json.loads(path.read_text())
    assert combined["models"]["clip"]["family"] == "clip" and combined["data"]["paper_data"] is False
    assert {r["model"] for r in combined["records"]} == {"clip", "fromage"}
    assert len(combined["records"]) == len(document["records"])
    first = (tmp_path / "out" / "tables.md").read_text()

    calls.clear()
    reproduce.run_reproduce(config, _fake_runner(document, calls))
    assert calls == []  # both finished with this configuration
    assert (tmp_path / "out" / "tables.md").read_text() == first
    config.precision = "bf16"
    reproduce.run_reproduce(config, _fake_runner(document, calls))
    assert calls == ["clip", "fromage"]  # another precision: another measurement

    calls.clear()
    (tmp_path / "fromage" / "pretrained_ckpt.pth.tar").write_bytes(b"retrained in place")
    reproduce.run_reproduce(config, _fake_runner(document, calls))
    assert calls == ["fromage"]  # the same configuration, but the model's files changed: measured again


def test_a_model_that_is_not_there_is_one_error_line_before_anything_runs(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tables.md").write_text("the tables of an earlier request")
    code = main(["reproduce", "--data-root", str(tmp_path), "--fromage", str(tiny_dir),
                 "--fromage-vis4", str(tmp_path / "no-such-model"), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "no-such-model") in err[0] and "not a directory" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["tables.md"]  # nothing ran: nothing written or removed
    assert (out / "tables.md").read_text() == "the tables of an earlier request"


def test_a_model_that_cannot_load_leaves_no_tables(tmp_path, tiny_dir, capsys):
    data = tmp_path / "data"
    write_vist(data, n=5, seed=1)
    write_visdial(data, n=2, seed=1, n_rounds=1)
    broken = tmp_path / "broken"  # a release directory whose checkpoint is missing: found out at load time
    broken.mkdir()
    (broken / "model_args.json").write_bytes((Path(tiny_dir) / "model_args.json").read_bytes())
    out = tmp_path / "out"
    (out).mkdir()
    (out / "tables.md").write_text("tables of an earlier request")
    code = main(["reproduce", "--data-root", str(data), "--fromage", str(tiny_dir), "--fromage-vis4", str(broken),
                 "--out", str(out), "--device", "cpu", "--no-cache", "--no-progress", "--limit", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken) in err[0], err
    assert not (out / "tables.md").exists() and not (out / "tables.csv").exists() and not (out / "results.json").exists()
    assert (out / "fromage" / "results.json").is_file()  # the model that loaded is done: a rerun reuses it


def test_no_model_runs_the_embedded_default(tmp_path, monkeypatch):
    from fromage_bench import embedded

    work = tmp_path / "work"
    monkeypatch.setattr(embedded, "ensure_model", lambda w: (Path(w) / "fromage" / "release", Path(w) / "retrieval"))
    monkeypatch.setattr(embedded, "standin_clip_dir", lambda w: Path(w) / "standins" / "clip", raising=False)
    seen = {}
    monkeypatch.setattr(reproduce, "run_reproduce", lambda config: seen.setdefault("config", config) and
                        (tmp_path / "results.json"))
    monkeypatch.setattr("fromage_bench.cli._write_report", lambda out: None)
    assert main(["reproduce", "--out", str(tmp_path / "out"), "--work", str(work)]) == 0
    config = seen["config"]
    assert config.data_root == work / "data"
    assert [(m.label, m.family, m.source) for m in config.models] == [
        ("clip", "clip", str(work / "standins" / "clip")), ("fromage", "fromage", str(work / "fromage" / "release"))]


# -- a killed reproduce resumes -----------------------------------------------------------------------------------
def _command(data: Path, out: Path, first: Path, second: Path) -> list[str]:
    return [sys.executable, "-m", "fromage_bench", "reproduce", "--data-root", str(data), "--fromage", str(first),
            "--fromage-vis4", str(second), "--out", str(out), "--device", "cpu", "--no-cache", "--no-progress",
            "--batch-size", "1"]


def _journal_lines(run: Path) -> int:
    return sum(f.read_bytes().count(b"\n") for f in run.glob(".journal/*/rank*.jsonl"))


@pytest.mark.slow
def test_a_killed_reproduce_resumes_to_the_uninterrupted_tables(tiny_dir, tiny_vis4_dir, tmp_path):
    data = tmp_path / "data"
    write_vist(data, n=5, seed=4)
    write_visdial(data, n=3, seed=4, n_rounds=2)
    out, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = _command(data, out, tiny_dir, tiny_vis4_dir)
    # killed during the second model's run, after the first one finished
    sigkill_when(cmd, lambda: _journal_lines(out / "fromage-vis4") >= 1, "a batch of the second model", timeout=300)
    assert (out / "fromage" / "results.json").is_file() and not (out / "tables.md").exists()
    first_model = (out / "fromage" / "results.json").read_bytes()

    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"fromage: finished in {out / 'fromage'} (not rerun)" in done.stdout
    assert (out / "fromage" / "results.json").read_bytes() == first_model
    second = json.loads((out / "fromage-vis4" / "results.json").read_text())
    assert sum(r["cost"]["work"]["batches_resumed"] for r in second["records"]) > 0  # the journal was read back

    reference = subprocess.run(_command(data, clean, tiny_dir, tiny_vis4_dir), cwd=REPO, env=child_env(),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert (out / "tables.csv").read_text() == (clean / "tables.csv").read_text()
    assert (out / "tables.md").read_text() == (clean / "tables.md").read_text()
    assert (out / "report.html").is_file()
    # the records carry their chance levels: 1 / pool for VisDial retrieval, 1 / 100 options for answer ranking
    combined = json.loads((out / "results.json").read_text())
    for r in combined["records"]:
        if r["task"] == "visdial_retrieval":
            assert r["chance"]["R@1"] == pytest.approx(100 / r["extra"]["pool_size"])
        if r["task"] == "visdial_ranking":
            assert r["chance"]["R@1"] == pytest.approx(1.0) and r["chance"]["R@10"] == pytest.approx(10.0)


def test_gill_rows_join_both_tables(tiny_dir, tmp_path):
    """`reproduce --gill DIR` (issue 17): a GILL release written by the independent writer gives GILL rows in Table 1
    (every VIST setting) and Table 2 (VisDial retrieval and answer ranking), with GILL's own paper figures on
    5cap4img and none where GILL's paper has none."""
    from tests.reference.tiny_gill_release import write_tiny_gill_release_dir

    gill = write_tiny_gill_release_dir(tmp_path / "gill", seed=3)
    data = tmp_path / "data"
    write_vist(data, n=4, seed=5)
    write_visdial(data, n=2, seed=5, n_rounds=2)
    out = tmp_path / "tables"
    assert main(["reproduce", "--data-root", str(data), "--fromage", str(tiny_dir), "--gill", str(gill),
                 "--out", str(out), "--device", "cpu", "--no-cache", "--no-progress", "--precision", "fp32"]) == 0
    lines = (out / "tables.md").read_text(encoding="utf-8").splitlines()
    sections = {}
    for line in lines:
        if line.startswith("## "):
            current = sections.setdefault(line, [])
        elif line.startswith("| GILL |"):
            current.append(line.split(" | ")[1])
    assert sections == {"## Table 1: VIST contextual image retrieval": ["1cap", "5cap", "5cap4img"],
                        "## Table 2: VisDial image retrieval": ["val"], "## Table 2: VisDial answer ranking": ["val"]}
    gill_5cap4img = next(l for l in lines if l.startswith("| GILL | 5cap4img |")).split(" | ")
    assert [gill_5cap4img[i] for i in (4, 7, 10)] == ["20.30", "45.00", "53.70"]  # GILL's paper: R@1/5/10
    gill_1cap = next(l for l in lines if l.startswith("| GILL | 1cap |")).split(" | ")
    assert gill_1cap[4] == "\u2014"  # GILL's paper reports 5cap4img only
    combined = json.loads((out / "results.json").read_text())
    assert combined["models"]["gill"]["family"] == "gill"
