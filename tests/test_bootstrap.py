"""fromage_bench.bootstrap: per-example values reproduce each metric; standard errors and intervals against
textbook formulas, a second median implementation and a coverage experiment with a known answer."""
import math

import numpy as np
import pytest
import torch

from fromage_bench import bootstrap
from tasks.metrics import mean_rank, mean_reciprocal_rank, median_rank, recall_at_k


def _vist(ranks, **metrics_override):
    ranks = [int(r) for r in ranks]
    metrics = {f"R@{k}": v for k, v in recall_at_k(ranks, (1, 5, 10)).items()}
    metrics.update(MRR=mean_reciprocal_rank(ranks), mean_rank=mean_rank(ranks), **metrics_override)
    record = {"task": "vist_retrieval", "metrics": metrics}
    return record, [{"story_id": str(40000 + i), "rank": r} for i, r in enumerate(ranks)]


def test_standard_errors_match_the_textbook_formulas():
    rng = np.random.default_rng(3)
    ranks = rng.integers(1, 40, size=400)
    record, predictions = _vist(ranks)
    u = bootstrap.uncertainty(record, predictions)
    assert (u["method"], u["resamples"], u["seed"], u["unit"], u["n_units"]) == ("bootstrap", 1000, 0, "story", 400)
    assert "not_available" not in u and set(u["ci95"]) == set(record["metrics"])
    n = len(ranks)
    for k in (1, 5, 10):
        p = float(np.mean(ranks <= k))
        assert u["stderr"][f"R@{k}"] == pytest.approx(100 * math.sqrt(p * (1 - p) / n), rel=0.1)
    assert u["stderr"]["MRR"] == pytest.approx(100 * np.std(1 / ranks, ddof=1) / math.sqrt(n), rel=0.1)
    assert u["stderr"]["mean_rank"] == pytest.approx(np.std(ranks, ddof=1) / math.sqrt(n), rel=0.1)
    for metric, (low, high) in u["ci95"].items():  # roughly the normal interval
        assert high - low == pytest.approx(2 * 1.96 * u["stderr"][metric], rel=0.15)


def test_seeded_and_repeatable():
    record, predictions = _vist(np.random.default_rng(0).integers(1, 20, size=50))
    assert bootstrap.uncertainty(record, predictions) == bootstrap.uncertainty(record, predictions)
    assert bootstrap.uncertainty(record, predictions)["ci95"] != bootstrap.uncertainty(record, predictions, seed=1)["ci95"]


def test_interval_coverage_of_a_known_recall():
    """200 seeded samples of 100 stories whose true R@5 is 40 %: about 95 % of the intervals hold 40."""
    rng = np.random.default_rng(11)
    trials, hits = 200, 0
    for _ in range(trials):
        ranks = np.where(rng.random(100) < 0.4, rng.integers(1, 6, size=100), rng.integers(6, 300, size=100))
        record, predictions = _vist(ranks)
        low, high = bootstrap.uncertainty(record, predictions)["ci95"]["R@5"]
        hits += low <= 40.0 <= high
    band = 3 * math.sqrt(0.95 * 0.05 / trials)  # binomial: 3 standard deviations of the observed coverage
    assert 0.95 - band <= hits / trials <= 0.95 + band


def test_paired_difference_coverage_of_a_known_drop():
    """Two runs on the same stories, NEW losing a story's top-10 hit with probability 1/20 (a true drop of 5
    points): the paired interval holds -5 in about 95 % of 200 seeded trials."""
    rng = np.random.default_rng(12)
    trials, hits = 200, 0
    for _ in range(trials):
        base_ranks = np.where(rng.random(200) < 0.6, 1, 50)
        new_ranks = np.where((base_ranks == 1) & (rng.random(200) < 1 / 12), 50, base_ranks)  # 0.6 / 12 = 1 / 20
        base = bootstrap.examples_of(*_vist(base_ranks))
        new = bootstrap.examples_of(*_vist(new_ranks))
        diffs, shared = bootstrap.paired_differences(base, new)
        assert shared == 200
        low, high = diffs["R@10"].ci95
        hits += low <= -5.0 <= high
    band = 3 * math.sqrt(0.95 * 0.05 / trials)
    assert 0.95 - band <= hits / trials <= 0.95 + band


def test_the_rounds_of_a_dialogue_are_resampled_together():
    """Ten rounds of a dialogue that always agree carry one dialogue's information, not ten."""
    rng = np.random.default_rng(5)
    per_dialogue = rng.choice([1, 30], size=60)
    predictions = [{"image_id": 1000 + d, "dialogue": d, "round_id": r + 1, "rank": int(per_dialogue[d]), "ndcg": None}
                   for d in range(60) for r in range(10)]
    ranks = [p["rank"] for p in predictions]
    record = {"task": "visdial_ranking", "metrics": {"R@1": recall_at_k(ranks, 1)[1], "MRR": mean_reciprocal_rank(ranks),
                                                     "NDCG": float("nan")}}
    u = bootstrap.uncertainty(record, predictions)
    p = float(np.mean(per_dialogue == 1))
    assert u["n_units"] == 60 and u["unit"].startswith("dialogue")
    assert u["stderr"]["R@1"] == pytest.approx(100 * math.sqrt(p * (1 - p) / 60), rel=0.1)  # not / 600


def test_ndcg_counts_the_annotated_rounds_only():
    values = {(0, 3): 80.0, (1, 1): 20.0, (2, 7): 50.0, (3, 2): 65.0}
    predictions = [{"image_id": 7 + d, "dialogue": d, "round_id": r + 1, "rank": 1, "ndcg": values.get((d, r))}
                   for d in range(4) for r in range(10)]
    record = {"task": "visdial_ranking", "metrics": {"NDCG": 53.75, "MRR": 100.0}}
    u = bootstrap.uncertainty(record, predictions)
    assert "not_available" not in u
    assert 20.0 <= u["ci95"]["NDCG"][0] < 53.75 < u["ci95"]["NDCG"][1] <= 80.0
    old = [{k: v for k, v in p.items() if k != "ndcg"} for p in predictions]  # a file from before per-round NDCG
    assert "ndcg" in bootstrap.uncertainty(record, old)["not_available"]["NDCG"]


def test_weighted_median_is_the_median_of_the_repeated_values():
    rng = np.random.default_rng(8)
    for _ in range(50):
        values = rng.integers(1, 30, size=int(rng.integers(1, 12))).astype(float)
        weights = rng.integers(0, 4, size=(1, values.size)).astype(float)
        if weights.sum() == 0:
            continue
        expected = median_rank(torch.tensor(np.repeat(values, weights[0].astype(int))))
        assert bootstrap._weighted_median(values, weights)[0] == expected


def test_image_text_captions_go_with_their_image():
    predictions = [{"direction": "t2i", "caption_index": q, "target": f"img{q // 5}", "rank": 1 + (q % 5 == 0) * 9}
                   for q in range(50)]
    predictions += [{"direction": "i2t", "image_id": f"img{i}", "rank": 1 + i} for i in range(10)]
    t2i = [p["rank"] for p in predictions[:50]]
    i2t = [p["rank"] for p in predictions[50:]]
    record = {"task": "image_text_retrieval", "metrics": {
        "t2i_R@1": recall_at_k(t2i, 1)[1], "t2i_median_rank": median_rank(t2i), "i2t_R@5": recall_at_k(i2t, 5)[5],
        "i2t_mean_rank": mean_rank(i2t)}}
    u = bootstrap.uncertainty(record, predictions)
    assert u["n_units"] == 10 and "not_available" not in u
    assert u["ci95"]["t2i_R@1"] == [80.0, 80.0]  # every image has four of its five captions at rank 1


def test_metrics_without_a_per_example_form_say_why():
    predictions = [{"image_id": f"{i}.jpg", "scores": {"BLEU-4": 10.0 * i, "CIDEr": 30.0 + i, "ROUGE-L": 40.0}}
                   for i in range(5)]
    record = {"task": "captioning", "metrics": {"BLEU-4": 12.0, "CIDEr": 32.0, "ROUGE-L": 40.0}}
    u = bootstrap.uncertainty(record, predictions)
    assert set(u["ci95"]) == {"CIDEr", "ROUGE-L"} and "no per-image BLEU statistics" in u["not_available"]["BLEU-4"]
    record, predictions = _vist([1, 2, 3, 4], **{"R@1": 50.0})  # the predictions say 25
    u = bootstrap.uncertainty(record, predictions)
    assert "R@1" not in u["ci95"] and "the predictions give 25" in u["not_available"]["R@1"]
    u = bootstrap.uncertainty({"task": "vist_retrieval", "metrics": {"R@1": 0.0}}, [{"story_id": "1"}])
    assert "rank" in u["not_available"]["R@1"]


def test_corpus_bleu_of_a_resample_is_pycocoevalcaps_bleu_of_those_captions():
    """BLEU statistics per image, summed over a resample, give what pycocoevalcap's corpus BLEU gives for the
    resampled captions (an image drawn twice counted twice)."""
    from pycocoevalcap.bleu.bleu import Bleu

    from tasks.captioning import bleu_statistics

    rng = np.random.default_rng(4)
    words = "a red blue small large circle star square on the left right at top bottom".split()
    keys = [str(i) for i in range(12)]
    res = {k: " ".join(rng.choice(words, size=int(rng.integers(2, 9)))) for k in keys}
    gts = {k: [" ".join(rng.choice(words, size=int(rng.integers(3, 10)))) for _ in range(int(rng.integers(1, 4)))]
           for k in keys}
    corpus, _ = Bleu(4).compute_score(gts, {k: [v] for k, v in res.items()}, verbose=0)
    stats = bleu_statistics(res, gts)
    predictions = [{"image_id": f"{k}.jpg", "scores": {}, "bleu_stats": stats[k]} for k in keys]
    record = {"task": "captioning", "metrics": {f"BLEU-{n + 1}": 100 * corpus[n] for n in range(4)}}
    examples = bootstrap.examples_of(record, predictions)
    assert not examples.not_available and set(examples.corpus) == set(record["metrics"])  # reproduced
    draw = rng.integers(0, 12, size=12)
    counts = np.bincount(draw, minlength=12)[None].astype(float)
    again = {f"{i}:{j}": k for i, j in enumerate(draw) for k in [keys[j]]}
    expected, _ = Bleu(4).compute_score({a: gts[k] for a, k in again.items()}, {a: [res[k]] for a, k in again.items()},
                                        verbose=0)
    got = bootstrap.statistics(examples, counts)
    for n in range(4):
        assert got[f"BLEU-{n + 1}"][0] == pytest.approx(100 * expected[n], rel=1e-9)
    assert "METEOR" in bootstrap.uncertainty({"task": "captioning", "metrics": {"METEOR": 1.0}},
                                             predictions)["not_available"]
