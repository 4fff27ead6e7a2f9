"""`fromage-bench eval`: the tasks x precisions matrix end to end on synthetic data in the real formats."""
import json

import pytest

from fromage_bench.cli import main
from fromage_bench.results import load, read_results
from fromage_bench.synth.visdial import write_visdial
from fromage_bench.synth.vist import write_vist


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_vist(root, n=6, seed=1, corrupt=1)
    write_visdial(root, n=3, seed=1)
    return root


@pytest.fixture(scope="module")
def run(tiny_dir, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    code = main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(data_root), "--out", str(out),
                 "--tasks", "vist_retrieval:5cap4img,visdial_ranking", "--precisions", "fp32,int8",
                 "--device", "cpu", "--no-progress", "--cache-dir", str(out.parent / "cache")])
    assert code == 0
    return out


def test_results_predictions_and_report(run):
    doc = read_results(run)
    records = doc["records"]
    keys = {(r["task"], r["protocol"], r["precision"]) for r in records}
    assert keys == {(t, p, q) for t in ("vist_retrieval", "visdial_ranking") for p in ("paper", "corrected")
                    for q in ("fp32", "int8")}
    for r in records:
        assert r["status"] == "ok" and r["metrics"] and r["n_examples"] > 0
        assert (run / r["predictions_file"]).is_file()
        lines = (run / r["predictions_file"]).read_text().splitlines()
        assert len(lines) == r["n_examples"] and json.loads(lines[0])
        cost = r["cost"]
        assert cost["load_seconds"] > 0 and cost["weight_bytes"] > 0 and cost["memory"]["cpu_rss_bytes"] > 0
        step = cost["latency"]["steps"][cost["latency"]["headline"]]
        assert step["batches_computed"] >= 1 and step["warmup"]["batch_ms"] > 0
        if step["steady"]:
            per_unit = step["steady"]["per_unit_ms"]
            assert per_unit["p50"] <= per_unit["p90"] <= per_unit["p99"]
        assert cost["examples_unit"] == {"vist_retrieval": "story", "visdial_ranking": "round"}[r["task"]]
        assert cost["examples_per_second"] > 0
    vist = [r for r in records if r["task"] == "vist_retrieval"]
    # stories share an album's photos: every story using the corrupt one is skipped, the others are scored
    assert all(r["n_skipped"] >= 1 and set(r["skipped"]) == {"corrupt image"} for r in vist)
    assert all(r["n_examples"] + r["n_skipped"] == 6 for r in vist)
    assert all(r["paper"] for r in vist if r["protocol"] == "paper")
    ranking = next(r for r in records if r["task"] == "visdial_ranking" and r["precision"] == "fp32")
    assert ranking["cost"]["throughput"]["tokens_scored_per_second"] > 0
    assert doc["environment"]["packages"]["torch"] and doc["config"]["precisions"] == ["fp32", "int8"]
    assert (run / "report.html").is_file()
    assert not list(run.glob(".staging*")) and not (run / ".journal").exists()


def test_every_metric_has_a_bootstrap_interval_or_a_reason(run):
    """The uncertainty block of each record, recomputed from the predictions file the run wrote."""
    for r in read_results(run)["records"]:
        u = r["uncertainty"]
        assert (u["method"], u["resamples"], u["seed"]) == ("bootstrap", 1000, 0) and u["n_units"] >= 2
        assert u["unit"] == {"vist_retrieval": "story", "visdial_ranking": "dialogue (its rounds together)"}[r["task"]]
        numbers = {m for m, v in r["metrics"].items() if v == v}
        assert set(u["ci95"]) == set(u["stderr"]) == numbers and "not_available" not in u  # NDCG per round included
        assert all(low <= high for low, high in u["ci95"].values()) and min(u["stderr"].values()) >= 0


def test_drift_against_the_highest_precision(run):
    records = read_results(run)["records"]
    for r in records:
        if r["precision"] == "int8":
            base = next(b for b in records if b["precision"] == "fp32" and b["task"] == r["task"]
                        and b["protocol"] == r["protocol"])
            assert r["drift"]["against"] == "fp32"
            for metric, delta in r["drift"].items():
                if metric != "against":
                    assert delta == pytest.approx(r["metrics"][metric] - base["metrics"][metric])
        else:
            assert "drift" not in r


def test_pandas_loader_and_csv(run, tmp_path):
    df = load(run)
    assert len(df) == 8 and {"task", "precision", "metrics.MRR", "cost.load_seconds"} <= set(df.columns)
    assert main(["results-csv", str(run), str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().count("\n") == 9


def test_second_run_reuses_cached_image_features(tiny_dir, data_root, run, tmp_path):
    out = tmp_path / "again"
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(data_root), "--out", str(out),
                 "--tasks", "vist_retrieval:5cap4img", "--precisions", "fp32", "--device", "cpu", "--no-progress",
                 "--cache-dir", str(run.parent / "cache")]) == 0
    first = {r["protocol"]: r for r in read_results(run)["records"]
             if r["task"] == "vist_retrieval" and r["precision"] == "fp32"}
    again = {r["protocol"]: r for r in read_results(out)["records"]}
    assert again["paper"]["cost"]["work"].get("images_encoded", 0) == 0  # every feature came from the cache
    assert again["paper"]["metrics"] == first["paper"]["metrics"]


def test_precision_the_machine_cannot_run_is_a_skipped_cell(tiny_dir, data_root, tmp_path, monkeypatch):
    real = __import__("importlib").util.find_spec
    monkeypatch.setattr("model.precision.importlib.util.find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    out = tmp_path / "skip"
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(data_root), "--out", str(out),
                 "--tasks", "visdial_retrieval", "--precisions", "fp32,int8", "--device", "cpu", "--no-progress",
                 "--no-cache"]) == 0
    records = read_results(out)["records"]
    skipped = [r for r in records if r["status"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["precision"] == "int8" and "bitsandbytes" in skipped[0]["reason"]


def test_config_file_and_flag_precedence(tiny_dir, data_root, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'tasks = "visdial_retrieval"\ndata_root = "{data_root}"\nprecisions = ["fp32"]\nlimit = 2\n'
                   f'model_dir = "{tiny_dir}"\n')
    out = tmp_path / "cfg"
    assert main(["eval", "--config", str(cfg), "--out", str(out), "--device", "cpu", "--no-progress", "--no-cache",
                 "--limit", "1"]) == 0
    doc = read_results(out)
    assert doc["config"]["limit"] == 1 and doc["config"]["tasks"] == "visdial_retrieval"
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text("tasks: visdial_retrieval\nbogus_key: 1\n")
    assert main(["eval", "--config", str(yaml_cfg), "--out", str(tmp_path / "y")]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task"], "unknown task"),
    (["--tasks", "vist_retrieval:7cap"], "unknown setting"),
    (["--tasks", "visdial_ranking", "--protocol", "fancy"], "unknown protocol"),
    (["--tasks", "visdial_ranking", "--precisions", "fp64"], "unknown precision"),
    (["--tasks", "visdial_ranking", "--option-batch-size", "0"], "--option-batch-size: must be >= 1"),
    (["--tasks", "image_text_retrieval:cc3m"], "cc3m_val.tsv: missing"),
])
def test_bad_arguments_fail_before_any_work(tiny_dir, data_root, tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(data_root), "--out", str(out),
                 "--device", "cpu", "--no-progress", "--no-cache", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "results.json").exists()


def test_bad_data_found_mid_run_leaves_no_results(tiny_dir, tmp_path, capsys):
    root = tmp_path / "data"
    write_visdial(root, n=2, seed=3)
    (root / "visdial" / "visdial_1.0_val.json").write_text('{"data": ')
    out = tmp_path / "partial"
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(root), "--out", str(out),
                 "--tasks", "visdial_retrieval", "--device", "cpu", "--no-progress", "--no-cache"]) == 2
    assert "malformed JSON" in capsys.readouterr().err
    assert not (out / "results.json").exists() and not (out / "predictions").exists()
    assert not list(out.glob(".staging*"))


def test_each_precision_frees_its_model_before_the_next_loads(tiny_dir, data_root, tmp_path, monkeypatch):
    """Nothing the runner keeps (records, costs, task contexts) holds a finished precision's model: it is
    garbage before the next precision's weights load, so peaks do not add up across precisions. Each model
    decodes on the static path first, as CUDA runs do (its decoders form a cycle with the LM)."""
    import weakref

    from PIL import Image

    import fromage_bench.runner as runner

    real_load, loaded, alive_at_load = runner.load_model, [], []

    def load_and_decode(*args, **kwargs):
        alive_at_load.append([ref() is not None for ref in loaded])  # no gc.collect here: the runner's job
        model = real_load(*args, **kwargs)
        model.generate([[Image.new("RGB", (40, 64), "red"), "A red"]], 4, decode="static")
        loaded.extend([weakref.ref(model), weakref.ref(model.model.lm)])
        return model

    monkeypatch.setattr(runner, "load_model", load_and_decode)  # (the family-detecting loader)
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(data_root), "--out", str(tmp_path / "r"),
                 "--tasks", "visdial_ranking", "--precisions", "fp32,bf16", "--device", "cpu", "--limit", "1",
                 "--no-progress", "--no-cache"]) == 0
    assert alive_at_load == [[], [False, False]]
    assert all(ref() is None for ref in loaded)
