"""Tests for tasks.metrics: hand-computed cases, torchmetrics cross-checks, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.retrieval import (
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_reciprocal_rank,
)

from tasks.metrics import (
    mean_rank,
    mean_reciprocal_rank,
    median_rank,
    ranks_from_scores,
    recall_at_k,
    retrieval_metrics,
    visdial_ndcg,
)

INF = float("inf")
LOG2_3 = math.log2(3)  # discount denominator at rank 2
LOG2_5 = math.log2(5)  # discount denominator at rank 4


# ---------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------


def test_ranks_ties_broken_by_column_index() -> None:
    scores = [[0.5, 0.9, 0.5, 0.1]] * 4
    # target 0: 1 + #higher{0.9}=1 + #tied-before{}=0           -> 2
    # target 1: 1 + 0 + 0                                        -> 1
    # target 2: 1 + #higher{0.9}=1 + #tied-before{col 0}=1       -> 3
    # target 3: 1 + #higher{0.5,0.9,0.5}=3 + 0                   -> 4
    ranks = ranks_from_scores(scores, [0, 1, 2, 3])
    assert ranks.dtype == torch.long
    assert ranks.tolist() == [2, 1, 3, 4]


def test_ranks_all_tied_row() -> None:
    # every column ties: rank = 1 + (number of columns before it)
    assert ranks_from_scores([[7.0, 7.0, 7.0]] * 3, [0, 1, 2]).tolist() == [1, 2, 3]


def test_ranks_with_masked_minus_inf() -> None:
    scores = [[-INF, 2.0, -INF, 1.0]] * 2
    # target 3 (score 1): 1 + #higher{2}=1                            -> 2
    # target 2 (-inf):    1 + #higher{2, 1}=2 + #tied-before{col 0}=1 -> 4
    assert ranks_from_scores(scores, [3, 2]).tolist() == [2, 4]


def test_ranks_accept_numpy_and_integer_scores() -> None:
    scores = np.array([[1, 3, 2], [3, 1, 2]])  # integer dtype is fine
    # row 0 target 2 (score 2): 1 + #higher{3} = 2; row 1 target 0 (score 3): 1
    assert ranks_from_scores(scores, np.array([2, 0])).tolist() == [2, 1]


def test_ranks_input_validation() -> None:
    with pytest.raises(ValueError):
        ranks_from_scores([[1.0, float("nan")]], [0])
    with pytest.raises(ValueError):
        ranks_from_scores([[1.0, 2.0]], [2])
    with pytest.raises(ValueError):
        ranks_from_scores([[1.0, 2.0]], [0, 1])
    with pytest.raises(ValueError):
        ranks_from_scores([1.0, 2.0], [0])
    with pytest.raises(ValueError):
        recall_at_k([], (1,))
    with pytest.raises(ValueError):
        recall_at_k([0, 1], (1,))
    with pytest.raises(ValueError):
        recall_at_k([1, 2], (0,))


def test_recall_k_larger_than_pool() -> None:
    # pool of 3 candidates; ranks 1, 3, 2
    ranks = [1, 3, 2]
    r = recall_at_k(ranks, ks=(1, 5, 10))
    assert list(r) == [1, 5, 10]
    assert r[1] == pytest.approx(100 * 1 / 3)  # only rank 1 is <= 1 -> 33.33
    assert r[5] == 100.0  # all 3 ranks <= 5
    assert r[10] == 100.0  # all 3 ranks <= 10
    assert recall_at_k(ranks, 2) == {2: pytest.approx(100 * 2 / 3)}  # ranks 1, 2 -> 66.67


def test_mrr_mean_median_hand() -> None:
    ranks = torch.tensor([1, 2, 4])
    # MRR = (1/1 + 1/2 + 1/4) / 3 = 1.75 / 3 = 0.58333 -> 58.333 %
    assert mean_reciprocal_rank(ranks) == pytest.approx(100 * 1.75 / 3)
    # mean = (1 + 2 + 4) / 3 = 7/3
    assert mean_rank(ranks) == pytest.approx(7 / 3)
    # odd count: middle value
    assert median_rank(ranks) == 2.0
    # even count [1, 2, 4, 10]: mean of the two middle values (2 + 4) / 2 = 3
    assert median_rank([10, 1, 4, 2]) == 3.0
    assert median_rank([5]) == 5.0


def test_retrieval_metrics_keys_and_values() -> None:
    scores = [
        [0.9, 0.1, 0.2],  # target 0 -> rank 1
        [0.9, 0.1, 0.2],  # target 2 -> rank 2
        [0.5, 0.5, 0.5],  # target 2 -> rank 3 (two tied columns before it)
    ]
    m = retrieval_metrics(scores, [0, 2, 2])
    assert list(m) == ["R@1", "R@5", "R@10", "MRR", "mean_rank", "median_rank"]
    assert m["R@1"] == pytest.approx(100 / 3)  # 1 of 3
    assert m["R@5"] == 100.0 and m["R@10"] == 100.0  # k > pool size 3
    assert m["MRR"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 3) / 3)  # 61.11
    assert m["mean_rank"] == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert m["median_rank"] == 2.0
    assert list(retrieval_metrics(scores, [0, 2, 2], ks=(2,))) == [
        "R@2", "MRR", "mean_rank", "median_rank"
    ]


def test_ndcg_hand_partial() -> None:
    relevance = [[1.0, 0.5, 0.0, 0.0]]  # k = 2 non-zero
    scores = [[0.1, 0.9, 0.3, 0.2]]  # ranking: col1, col2, col3, col0
    # DCG  = rel[col1]/log2(2) + rel[col2]/log2(3) = 0.5/1 + 0/1.585 = 0.5
    # IDCG = 1.0/log2(2) + 0.5/log2(3)            = 1 + 0.31546     = 1.31546
    # NDCG = 0.5 / 1.31546 = 0.380094 -> 38.0094 %
    expected = 100 * 0.5 / (1 + 0.5 / LOG2_3)
    assert visdial_ndcg(scores, relevance) == pytest.approx(expected)
    assert expected == pytest.approx(38.0094, abs=1e-3)


def test_ndcg_perfect_ranking_is_100() -> None:
    relevance = [[1.0, 0.5, 0.5, 0.0]]
    scores = [[4.0, 3.0, 2.0, 1.0]]  # ranking follows relevance exactly
    assert visdial_ndcg(scores, relevance) == 100.0


def test_ndcg_reversed_ranking() -> None:
    # k = 2; reversed order puts the two zero-relevance options in the top 2 -> DCG = 0
    assert visdial_ndcg([[1.0, 2.0, 3.0, 4.0]], [[1.0, 0.5, 0.0, 0.0]]) == 0.0
    # all four relevant (k = 4); reversed ranking sees rel 0.25, 0.5, 0.5, 1.0
    # DCG  = 0.25/1 + 0.5/log2(3) + 0.5/log2(4) + 1.0/log2(5)
    #      = 0.25 + 0.315465 + 0.25 + 0.430677 = 1.246141
    # IDCG = 1.0/1 + 0.5/log2(3) + 0.5/log2(4) + 0.25/log2(5)
    #      = 1 + 0.315465 + 0.25 + 0.107669    = 1.673134
    # NDCG = 0.744795 -> 74.4795 %
    dcg = 0.25 + 0.5 / LOG2_3 + 0.5 / 2 + 1.0 / LOG2_5
    idcg = 1.0 + 0.5 / LOG2_3 + 0.5 / 2 + 0.25 / LOG2_5
    got = visdial_ndcg([[1.0, 2.0, 3.0, 4.0]], [[1.0, 0.5, 0.5, 0.25]])
    assert got == pytest.approx(100 * dcg / idcg)
    assert got == pytest.approx(74.4795, abs=1e-3)


def test_ndcg_all_zero_round_skipped() -> None:
    scores = [[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]]
    relevance = [[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    # round 0: perfect -> 100; round 1: all-zero relevance -> skipped (not 0, not NaN)
    # mean over the remaining single round = 100
    assert visdial_ndcg(scores, relevance) == 100.0
    # no round left -> nan
    assert math.isnan(visdial_ndcg([[1.0, 2.0]], [[0.0, 0.0]]))


def test_ndcg_ties_broken_by_option_index() -> None:
    # options 0 and 1 tie; k = 1 -> only the first ranked option counts, and that is option 0.
    # relevance on option 1: DCG = 0 -> NDCG 0
    assert visdial_ndcg([[0.5, 0.5, 0.1]], [[0.0, 1.0, 0.0]]) == 0.0
    # relevance on option 0: DCG = IDCG = 1 -> NDCG 100
    assert visdial_ndcg([[0.5, 0.5, 0.1]], [[1.0, 0.0, 0.0]]) == 100.0


def test_ndcg_chunked_ordering_matches_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.metrics as metrics

    gen = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 4, (9, 10), generator=gen).double()  # many ties
    relevance = torch.randint(0, 3, (9, 10), generator=gen).double() / 2
    full = visdial_ndcg(scores, relevance)
    monkeypatch.setattr(metrics, "_PAIRWISE_BUDGET", 250)  # 2 rows (2*10*10) per chunk
    assert visdial_ndcg(scores, relevance) == full
    # order = score descending, then option index ascending (a stable descending sort)
    expected = torch.sort(scores, dim=1, descending=True, stable=True).indices
    assert torch.equal(metrics._order_from_scores(scores), expected)


def test_ndcg_averages_rounds_and_validates() -> None:
    scores = [[0.1, 0.9, 0.3, 0.2], [4.0, 3.0, 2.0, 1.0]]
    relevance = [[1.0, 0.5, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]]
    # (38.0094 + 100) / 2
    assert visdial_ndcg(scores, relevance) == pytest.approx(
        (100 * 0.5 / (1 + 0.5 / LOG2_3) + 100) / 2
    )
    with pytest.raises(ValueError):
        visdial_ndcg([[1.0, 2.0]], [[1.0, -0.5]])
    with pytest.raises(ValueError):
        visdial_ndcg([[1.0, 2.0]], [[1.0, 0.5, 0.0]])


# ---------------------------------------------------------------------------
# Cross-checks against torchmetrics (untied, seeded random inputs)
# ---------------------------------------------------------------------------


def _untied_scores(gen: torch.Generator, n: int, c: int) -> torch.Tensor:
    """Strictly positive float32 scores with distinct values inside every row.

    Positive because torchmetrics' ``retrieval_reciprocal_rank`` treats every candidate whose
    score is <= 0 as non-relevant (``target = where(preds > 0, target, 0)``): with negative scores
    (e.g. negative losses, as in VisDial answer ranking) it returns RR = 0 whatever the ranking.
    Our MRR depends only on the ranking.
    """
    rows = [torch.randperm(c, generator=gen).to(torch.float32) + 1.0 for _ in range(n)]
    noise = torch.rand(n, c, generator=gen) * 0.5  # < 1, keeps the permutation order distinct
    return torch.stack(rows) + noise


def test_crosscheck_reciprocal_rank_and_hit_rate() -> None:
    gen = torch.Generator().manual_seed(0)
    n, c = 64, 37
    scores = _untied_scores(gen, n, c)
    targets = torch.randint(0, c, (n,), generator=gen)
    ranks = ranks_from_scores(scores, targets)
    onehot = torch.nn.functional.one_hot(targets, c).bool()

    rr = torch.stack([retrieval_reciprocal_rank(scores[i], onehot[i]) for i in range(n)])
    torch.testing.assert_close(1.0 / ranks.double(), rr.double())
    assert mean_reciprocal_rank(ranks) == pytest.approx(100 * rr.double().mean().item())

    ks = (1, 5, 10, 36, 37, 50)
    rec = recall_at_k(ranks, ks)
    for k in ks:
        hits = torch.stack(
            [retrieval_hit_rate(scores[i], onehot[i], top_k=k) for i in range(n)]
        )
        assert rec[k] == pytest.approx(100 * hits.double().mean().item())


def test_crosscheck_ndcg_untied() -> None:
    """Compare with torchmetrics' NDCG where the definitions coincide.

    ``retrieval_normalized_dcg(preds, target, top_k)`` on one row uses gain = relevance (linear,
    not 2^rel - 1), discount 1/log2(rank + 1) truncated at ``top_k`` for both DCG and IDCG.  That is
    VisDial's NDCG when ``top_k`` = the row's number of non-zero relevances and there are no tied
    scores.  Differences:
    * ties: torchmetrics (like sklearn) averages the gains inside a tied group, VisDial breaks ties
      by option index (see ``test_ndcg_tie_handling_differs_from_torchmetrics``);
    * all-zero relevance rows: torchmetrics scores them 0, we skip them;
    * torchmetrics flattens its input (one query per call) and takes one ``top_k`` per call, so it
      is called row by row here.
    """
    gen = torch.Generator().manual_seed(1)
    n, c = 48, 100
    scores = _untied_scores(gen, n, c)
    levels = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0])
    relevance = levels[torch.randint(0, len(levels), (n, c), generator=gen)]
    relevance[0, :] = 0.0  # one all-zero round: skipped by us
    relevance[1, :] = 0.0
    relevance[1, 5] = 1.0  # a single relevant option (k = 1)

    per_row = []
    for i in range(1, n):
        k = int((relevance[i] != 0).sum())
        per_row.append(retrieval_normalized_dcg(scores[i], relevance[i], top_k=k).item())
        assert visdial_ndcg(scores[i : i + 1], relevance[i : i + 1]) == pytest.approx(
            100 * per_row[-1], abs=1e-4
        )
    assert visdial_ndcg(scores, relevance) == pytest.approx(
        100 * float(np.mean(per_row)), abs=1e-4
    )


def test_ndcg_tie_handling_differs_from_torchmetrics() -> None:
    scores = torch.tensor([0.5, 0.5, 0.1])
    relevance = torch.tensor([0.0, 1.0, 0.0])  # k = 1
    # VisDial: option 0 wins the tie, its relevance is 0 -> NDCG 0
    assert visdial_ndcg(scores[None], relevance[None]) == 0.0
    # torchmetrics averages the tied group {0, 1}: mean gain 0.5 at the single top-1 slot
    # -> DCG 0.5 / IDCG 1 = 0.5
    tm = retrieval_normalized_dcg(scores, relevance, top_k=1).item()
    assert tm == pytest.approx(0.5)


# ---------------------------------------------------------------------------
# Property-based tests
# ---------------------------------------------------------------------------

FAST = settings(max_examples=60, deadline=None)


@st.composite
def score_matrices(draw, max_n: int = 6, max_c: int = 12, allow_ties: bool = True):
    """(scores, targets): small integer-valued scores (ties likely) or distinct scores."""
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    if allow_ties:
        vals = st.one_of(st.integers(-3, 3).map(float), st.just(-INF))
        rows = [draw(st.lists(vals, min_size=c, max_size=c)) for _ in range(n)]
    else:
        uniq = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
        rows = [draw(st.lists(uniq, min_size=c, max_size=c, unique=True)) for _ in range(n)]
    targets = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(targets)


@FAST
@given(score_matrices())
def test_prop_ranks_in_range_and_match_definition(data) -> None:
    scores, targets = data
    n, c = scores.shape
    ranks = ranks_from_scores(scores, targets)
    assert ranks.shape == (n,)
    assert ((ranks >= 1) & (ranks <= c)).all()
    # the ranks of all columns of a row are a permutation of 1..C (ties fully broken)
    for i in range(n):
        all_r = ranks_from_scores(scores[i].expand(c, c), torch.arange(c))
        assert sorted(all_r.tolist()) == list(range(1, c + 1))
    # ranking is invariant to adding a constant (unlike torchmetrics' RR, see above)
    torch.testing.assert_close(ranks_from_scores(scores - 1000.0, targets), ranks)


@FAST
@given(score_matrices(), st.lists(st.integers(1, 20), min_size=1, max_size=6))
def test_prop_recall_monotone_and_full_at_pool_size(data, ks) -> None:
    scores, targets = data
    c = scores.shape[1]
    ranks = ranks_from_scores(scores, targets)
    ks = sorted(ks)
    rec = recall_at_k(ranks, ks)
    values = [rec[k] for k in ks]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert all(0.0 <= v <= 100.0 for v in values)
    assert recall_at_k(ranks, (c,))[c] == 100.0
    assert recall_at_k(ranks, (c + 7,))[c + 7] == 100.0


@FAST
@given(score_matrices())
def test_prop_mrr_range_and_summary_consistency(data) -> None:
    scores, targets = data
    ranks = ranks_from_scores(scores, targets)
    mrr = mean_reciprocal_rank(ranks)
    assert 0.0 < mrr <= 100.0
    m = retrieval_metrics(scores, targets)
    assert m["MRR"] == mrr
    assert 1.0 <= m["median_rank"] <= scores.shape[1]
    assert 1.0 <= m["mean_rank"] <= scores.shape[1]
    assert m["R@1"] == recall_at_k(ranks, 1)[1]


@FAST
@given(score_matrices(allow_ties=False), st.randoms(use_true_random=False))
def test_prop_column_permutation_invariance_without_ties(data, rnd) -> None:
    scores, targets = data
    c = scores.shape[1]
    perm = list(range(c))
    rnd.shuffle(perm)
    perm_t = torch.tensor(perm)  # new column j holds old column perm[j]
    inv = torch.argsort(perm_t)  # old column t is now at inv[t]
    ranks = ranks_from_scores(scores, targets)
    torch.testing.assert_close(ranks_from_scores(scores[:, perm_t], inv[targets]), ranks)


@st.composite
def ndcg_inputs(draw, max_n: int = 5, max_c: int = 12):
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    rel_vals = st.sampled_from([0.0, 0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0])
    relevance = [draw(st.lists(rel_vals, min_size=c, max_size=c)) for _ in range(n)]
    score_vals = st.one_of(st.integers(-3, 3).map(float), st.floats(-10, 10), st.just(-INF))
    scores = [draw(st.lists(score_vals, min_size=c, max_size=c)) for _ in range(n)]
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(relevance)


@FAST
@given(ndcg_inputs())
def test_prop_ndcg_in_range(data) -> None:
    scores, relevance = data
    v = visdial_ndcg(scores, relevance)
    if (relevance != 0).any(dim=1).any():
        assert -1e-9 <= v <= 100.0 + 1e-9
    else:
        assert math.isnan(v)


@FAST
@given(
    st.integers(1, 5).flatmap(
        lambda c: st.lists(
            st.lists(st.floats(0.01, 1.0), min_size=c, max_size=c, unique=True),
            min_size=1,
            max_size=4,
        )
    )
)
def test_prop_ndcg_perfect_when_scores_equal_relevance(rows) -> None:
    rel = torch.tensor(rows, dtype=torch.float64)
    assert visdial_ndcg(rel, rel) == pytest.approx(100.0, abs=1e-9)
    # and with some zero-relevance options that score lowest
    padded = torch.cat([rel, torch.zeros(rel.shape[0], 3, dtype=torch.float64)], dim=1)
    scores = torch.cat([rel, -torch.arange(1, 4, dtype=torch.float64).expand(rel.shape[0], 3)], 1)
    assert visdial_ndcg(scores, padded) == pytest.approx(100.0, abs=1e-9)
