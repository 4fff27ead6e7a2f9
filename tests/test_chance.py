"""Chance levels (tasks/chance.py): each against a hand computation, an exhaustive enumeration or a Monte-Carlo
simulation of a random scorer through the tasks' own ranking code (fixed seed), and the records carry them."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from model.datasets import Story
from tasks import chance
from tasks.image_text import image_to_text_ranks, text_to_image_ranks
from tasks.metrics import mean_rank, mean_reciprocal_rank, ranks_from_scores, recall_at_k, visdial_ndcg
from tasks.visdial import DenseAnnotation, N_OPTIONS, ranking_chance, ranking_metrics
from tasks.vist import mask_context, unmasked_pool_sizes


# -- by hand --------------------------------------------------------------------------------------------
def test_rank_chance_by_hand():
    # one pool of 4: R@1 = 1/4, R@5 = 1 (k beyond the pool), MRR = (1 + 1/2 + 1/3 + 1/4) / 4 = 25/48
    levels = chance.rank_chance([4, 4, 4], (1, 5), median=True)
    assert levels["R@1"] == pytest.approx(25.0)
    assert levels["R@5"] == pytest.approx(100.0)
    assert levels["MRR"] == pytest.approx(100 * 25 / 48)
    assert levels["mean_rank"] == pytest.approx(2.5) and levels["median_rank"] == pytest.approx(2.5)
    # pools of 2 and 4: the mean of the per-query levels; no median for mixed pools
    mixed = chance.rank_chance([2, 4], (1,), prefix="t2i_", median=True)
    assert mixed == pytest.approx({"t2i_R@1": (50 + 25) / 2, "t2i_MRR": 100 * (0.75 + 25 / 48) / 2,
                                   "t2i_mean_rank": (1.5 + 2.5) / 2})
    assert chance.rank_chance([], (1,)) == {}


def test_ndcg_chance_by_hand_and_by_enumeration():
    rel = [1.0, 0.0, 0.5, 0.0]  # k = 2 non-zero; mean relevance 0.375
    d2 = 1 / math.log2(3)
    by_hand = 100 * 0.375 * (1 + d2) / (1 + 0.5 * d2)
    assert chance.ndcg_chance([rel]) == pytest.approx(by_hand)
    # every one of the 24 orders, scored by the metric itself: the exact expectation
    exact = sum(visdial_ndcg(torch.tensor([[-float(p.index(c)) for c in range(4)]]), torch.tensor([rel]))
                for p in itertools.permutations(range(4))) / 24
    assert chance.ndcg_chance([rel]) == pytest.approx(exact)
    # an all-zero round has no NDCG (the metric leaves it out), nor a chance level
    assert chance.ndcg_chance([rel, [0.0] * 4]) == pytest.approx(by_hand)
    assert math.isnan(chance.ndcg_chance([[0.0] * 4]))


def test_best_of_chance_by_hand():
    # 2 own captions among 4: P(none in the top 1) = 2/4, so R@1 = 50; in the top 2: (2/4)(1/3), R@2 = 5/6
    assert chance.best_of_recall_chance([(4, 2)], 1) == pytest.approx(50.0)
    assert chance.best_of_recall_chance([(4, 2)], 2) == pytest.approx(100 * 5 / 6)
    assert chance.best_of_recall_chance([(4, 2)], 3) == pytest.approx(100.0)
    # E[min of 2 of 1..4 without replacement]: pairs (1,x) x3 -> 1, (2,x) x2 -> 2, (3,4) -> 3: 10/6 = 5/3
    assert chance.best_of_mean_rank_chance([(4, 2)]) == pytest.approx(5 / 3)
    # one correct candidate: the plain levels
    assert chance.best_of_recall_chance([(7, 1)], 3) == pytest.approx(chance.recall_chance([7], 3))


# -- Monte Carlo through the tasks' ranking code -----------------------------------------------------------
TRIALS = 4000


def test_vist_chance_matches_random_scores_through_the_mask():
    pool = [f"p{i}" for i in range(12)]
    # a story whose context repeats a photo, and one with a context photo not in the pool (unreadable)
    stories = [Story("a", ("p0", "p1", "p2", "p3", "p4"), ("c",) * 5),
               Story("b", ("p5", "p5", "p6", "p7", "p8"), ("c",) * 5),
               Story("c", ("p9", "gone", "p10", "p11", "p1"), ("c",) * 5)]
    sizes = unmasked_pool_sizes(stories, pool)
    assert sizes == [8, 9, 9]
    column = {pid: i for i, pid in enumerate(pool)}
    g = torch.Generator().manual_seed(0)
    ranks = []
    for _ in range(TRIALS // 4):
        scores = torch.rand(len(stories), len(pool), generator=g)
        masked = mask_context(scores, [[column[p] for p in s.context if p in column] for s in stories])
        ranks.append(ranks_from_scores(masked, torch.tensor([column[s.target] for s in stories])))
    ranks = torch.cat(ranks)
    expected = chance.rank_chance(sizes, (1, 5, 10))
    simulated = {f"R@{k}": v for k, v in recall_at_k(ranks, (1, 5, 10)).items()}
    simulated.update(MRR=mean_reciprocal_rank(ranks), mean_rank=mean_rank(ranks))
    for metric, value in expected.items():
        tolerance = 0.1 if metric == "mean_rank" else 2.5  # ~4 standard errors of 3000 queries
        assert simulated[metric] == pytest.approx(value, abs=tolerance), metric


def test_image_text_chance_matches_random_embeddings():
    from tasks.caption_data import CaptionedImage
    from tasks.image_text import retrieval_chance

    captions_per_image = [1, 3, 2, 1, 4, 1]
    items = [CaptionedImage(image_id=str(i), name=f"{i}.jpg", path=None, captions=[f"c{i}.{j}" for j in range(m)])
             for i, m in enumerate(captions_per_image)]
    caption_image = [i for i, m in enumerate(captions_per_image) for _ in range(m)]
    g = torch.Generator().manual_seed(1)
    t2i, i2t = [], []
    for _ in range(TRIALS // 10):
        image = torch.randn(len(items), 8, generator=g)
        text = torch.randn(len(caption_image), 8, generator=g)
        t2i.append(text_to_image_ranks(text, image, caption_image)[0])
        i2t.append(image_to_text_ranks(image, text, caption_image)[0])
    t2i, i2t = torch.cat(t2i), torch.cat(i2t)
    expected = retrieval_chance(items)
    for k in (1, 5, 10):
        assert recall_at_k(t2i, k)[k] == pytest.approx(expected[f"t2i_R@{k}"], abs=3.0)
        assert recall_at_k(i2t, k)[k] == pytest.approx(expected[f"i2t_R@{k}"], abs=3.0)
    assert mean_rank(t2i) == pytest.approx(expected["t2i_mean_rank"], abs=0.1)
    assert mean_rank(i2t) == pytest.approx(expected["i2t_mean_rank"], abs=0.15)
    assert torch.median(t2i.float()).item() == pytest.approx(expected["t2i_median_rank"], abs=0.5)


def test_visdial_ranking_chance_matches_random_scores():
    g = torch.Generator().manual_seed(2)
    n_dialogues, n_rounds = 4, 3
    relevance = [torch.bernoulli(torch.full((N_OPTIONS,), 0.1), generator=g) * torch.randint(1, 3, (N_OPTIONS,),
                                                                                           generator=g) / 2
                 for _ in range(n_dialogues)]
    annotations = [DenseAnnotation(i, i, 2, tuple(float(x) for x in relevance[i])) for i in range(n_dialogues)]
    targets = [(i, 1) for i in range(n_dialogues - 1)] + [None]  # the last annotation's round was not scored
    gt = {(i, r): int(torch.randint(N_OPTIONS, (1,), generator=g)) for i in range(n_dialogues) for r in range(n_rounds)}
    sums: dict[str, float] = {}
    trials = 600
    for _ in range(trials):
        scores = {key: torch.rand(N_OPTIONS, generator=g) for key in gt}
        metrics, _, _ = ranking_metrics(scores, gt, annotations, targets, "corrected")
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value / trials
    expected = ranking_chance(scores, annotations, targets)
    assert set(expected) == set(sums)
    assert expected["R@1"] == pytest.approx(1.0) and expected["R@20"] == pytest.approx(20.0)
    assert expected["MRR"] == pytest.approx(100 * chance.harmonic(100) / 100)
    for name, value in expected.items():
        tolerance = {"mean_rank": 1.5, "NDCG": 1.0}.get(name, 1.0)
        assert sums[name] == pytest.approx(value, abs=tolerance), name
