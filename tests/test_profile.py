"""`fromage-bench profile`: every scenario at several precisions on CPU, results in the shared schema."""
import json

import pytest
import torch

from fromage_bench.cli import main
from fromage_bench.devices import peak_bandwidth
from fromage_bench.profiler import SCENARIOS, _decode_roofline, time_it
from fromage_bench.results import load, read_results


def test_every_scenario_on_the_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "prof"
    code = main(["profile", "--model-dir", str(tiny_dir), "--out", str(out), "--precisions", "fp32,int8",
                 "--repeats", "2", "--warmup", "1", "--min-seconds", "0", "--pool-sizes", "100,1000",
                 "--decode-batch-sizes", "1,2",
                 "--new-tokens", "4", "--device", "cpu"])
    assert code == 0
    doc = read_results(out)
    records = doc["records"]
    assert {r["scenario"] for r in records} == set(SCENARIOS)
    assert {r["precision"] for r in records} == {"fp32", "int8"}
    assert all(r["status"] == "ok" and r["cost"]["seconds"]["median"] > 0 for r in records)
    decode1 = [r for r in records if r["scenario"] == "decode" and r["params"]["batch_size"] == 1]
    assert all("roofline" in r and r["roofline"]["weight_bytes"] > 0 for r in decode1)
    int8 = next(r for r in decode1 if r["precision"] == "int8")["roofline"]["weight_bytes"]
    fp32 = next(r for r in decode1 if r["precision"] == "fp32")["roofline"]["weight_bytes"]
    assert int8 < fp32
    df = load(out)
    assert len(df) == len(records) and "cost.seconds.median" in df.columns
    assert doc["environment"]["packages"]["torch"]


def test_decode_paths_each_get_a_record_and_int8_skips_the_static_step(tiny_dir, tmp_path):
    out = tmp_path / "paths"
    assert main(["profile", "--model-dir", str(tiny_dir), "--out", str(out), "--precisions", "fp32,int8",
                 "--scenarios", "decode", "--decode-paths", "auto,static", "--decode-batch-sizes", "1",
                 "--repeats", "1", "--warmup", "0", "--min-seconds", "0", "--new-tokens", "3", "--device", "cpu"]) == 0
    records = {(r["precision"], r["params"].get("path", "auto")): r for r in read_results(out)["records"]}
    assert set(records) == {("fp32", "auto"), ("fp32", "static"), ("int8", "auto"), ("int8", "static")}
    assert records["fp32", "static"]["status"] == "ok"
    assert records["fp32", "static"]["roofline"]["measured_tokens_per_second"] > 0
    skipped = records["int8", "static"]
    assert skipped["status"] == "skipped" and "int8" in skipped["reason"] and "cost" not in skipped


def test_a_failing_path_is_recorded_and_the_others_still_run(tiny_dir, tmp_path, monkeypatch, capsys):
    import fromage_bench.profiler as profiler

    real_generate = profiler.generate

    def generate(model, batch, n, **kwargs):
        if kwargs.get("decode") == "static":
            raise RuntimeError("compiler exploded\nsecond line")
        return real_generate(model, batch, n, **kwargs)

    monkeypatch.setattr(profiler, "generate", generate)
    out = tmp_path / "failing"
    assert main(["profile", "--model-dir", str(tiny_dir), "--out", str(out), "--precisions", "fp32",
                 "--scenarios", "decode,option_scoring", "--decode-paths", "static,auto", "--decode-batch-sizes", "1",
                 "--options", "4", "--repeats", "1", "--warmup", "0", "--min-seconds", "0", "--new-tokens", "3",
                 "--device", "cpu"]) == 1
    records = read_results(out)["records"]
    assert [(r["scenario"], r["params"].get("path"), r["status"]) for r in records] == [
        ("decode", "static", "error"), ("decode", None, "ok"), ("option_scoring", None, "ok")]
    assert records[0]["reason"] == "RuntimeError: compiler exploded"
    err = capsys.readouterr().err
    assert "failed: RuntimeError: compiler exploded" in err
    # one line per item as it is measured, so a run cut short still shows its figures
    ok_decode = records[1]
    assert (f"profile decode fp32 (batch_size=1, prompt_tokens=32, new_tokens=3): "
            f"{ok_decode['cost']['seconds_per_token'] * 1000:.2f} ms/token") in err
    assert "profile decode fp32 (batch_size=1, prompt_tokens=32, new_tokens=3, path=static): error: RuntimeError" in err
    assert ("profile option_scoring fp32 (options=4, context_tokens=120, option_tokens=7, option_batch_size=100): "
            "median ") in err
    assert "error: RuntimeError: compiler exploded" in (out / "report.html").read_text()


def test_roofline_arithmetic(tiny):
    weight = tiny.model.lm
    roof = _decode_roofline(tiny, per_token_seconds=0.01, bandwidth=peak_bandwidth(torch.device("cpu"), override=1e9),
                            copy_bandwidth=None)
    # 100 tokens/s measured; the roofline is bandwidth / bytes; the fraction is bytes*rate / bandwidth
    assert roof["measured_tokens_per_second"] == pytest.approx(100.0)
    assert roof["roofline_tokens_per_second"] == pytest.approx(1e9 / roof["weight_bytes"])
    assert roof["fraction_of_roofline"] == pytest.approx(roof["weight_bytes"] * 100.0 / 1e9)
    assert weight is not None


def test_time_it_counts_repeats_after_warmup():
    import torch

    calls = []
    times = time_it(lambda: calls.append(1), torch.device("cpu"), warmup=3, repeats=4)
    assert len(calls) == 7 and len(times) == 4


@pytest.mark.slow
def test_paper_architecture_small_random_init(tmp_path):
    out = tmp_path / "p"
    assert main(["profile", "--random-init", "--opt-version", "facebook/opt-125m", "--visual-model",
                 "openai/clip-vit-base-patch32", "--device", "cpu", "--precisions", "bf16", "--out", str(out),
                 "--repeats", "1", "--warmup", "0", "--min-seconds", "0", "--image-batch-sizes", "1",
                 "--context-lengths", "16",
                 "--decode-batch-sizes", "1", "--new-tokens", "2", "--options", "4", "--pool-sizes", "100"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 5 and all(r["status"] == "ok" for r in records)
    assert records[0]["cost"]["weight_bytes"] > 2 * 200e6  # OPT-125m + ViT-B/32 in bf16


@pytest.mark.parametrize("argv, message", [
    (["--scenarios", "warp"], "unknown scenario"),
    (["--precisions", "fp64"], "unknown precision"),
    (["--new-tokens", "1"], "must be >= 2"),
    (["--decode-paths", "auto,warp"], "unknown decode path"),
    (["--option-batch-size", "0"], "--option-batch-size: must be >= 1"),
])
def test_bad_profile_arguments(tiny_dir, tmp_path, capsys, argv, message):
    assert main(["profile", "--model-dir", str(tiny_dir), "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_each_precision_frees_its_model_before_the_next_loads(tiny_dir, tmp_path, monkeypatch):
    """The timed closures hold the model; none outlives its precision, so the next load starts from free memory
    (the static path's decoders form a cycle with the LM: only a collection frees them)."""
    import weakref

    import fromage_bench.profiler as profiler

    real_load, loaded, alive_at_load = profiler.load_fromage, [], []

    def load(*args, **kwargs):
        alive_at_load.append([ref() is not None for ref in loaded])  # no gc.collect here: the profiler's job
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model.model.lm))
        return model

    monkeypatch.setattr(profiler, "load_fromage", load)
    assert main(["profile", "--model-dir", str(tiny_dir), "--out", str(tmp_path / "p"), "--precisions", "fp32,bf16",
                 "--scenarios", "decode", "--decode-paths", "static", "--decode-batch-sizes", "1", "--repeats", "1",
                 "--warmup", "0", "--min-seconds", "0", "--new-tokens", "2", "--device", "cpu"]) == 0
    assert alive_at_load == [[], [False]]
    assert loaded[1]() is None


def test_option_scoring_projection_predicts_the_evals_work(tiny_dir, tmp_path):
    """`profile`'s VisDial round is `eval`'s: per round the same scoring calls, forward passes (the chunking)
    and options; the projection scales that per-round work to VisDial val."""
    from fromage_bench.profiler import ROUND_WORK, VISDIAL_VAL_ROUNDS
    from fromage_bench.synth.visdial import write_visdial

    data = tmp_path / "data"
    write_visdial(data, n=2, seed=2, n_rounds=3)
    eval_out, prof_out = tmp_path / "eval", tmp_path / "prof"
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(data), "--out", str(eval_out),
                 "--tasks", "visdial_ranking", "--precisions", "fp32", "--device", "cpu", "--no-progress",
                 "--no-cache", "--option-batch-size", "7"]) == 0
    results = read_results(eval_out)
    assert results["config"]["option_batch_size"] == 7
    work = results["records"][0]["cost"]["work"]
    assert main(["profile", "--model-dir", str(tiny_dir), "--out", str(prof_out), "--precisions", "fp32",
                 "--scenarios", "option_scoring", "--option-batch-size", "7", "--repeats", "1", "--warmup", "0",
                 "--min-seconds", "0",
                 "--device", "cpu"]) == 0
    (record,) = read_results(prof_out)["records"]
    assert record["params"]["option_batch_size"] == 7
    projection = record["projection"]
    rounds = 2 * 3
    assert projection["work_per_round"] == {"scoring_calls": 2, "scoring_passes": 2 * 15, "continuations_scored": 200}
    assert {k: work[k] for k in ROUND_WORK} == {k: rounds * v for k, v in projection["work_per_round"].items()}
    assert projection["projected_work"] == {k: VISDIAL_VAL_ROUNDS * v for k, v in projection["work_per_round"].items()}
