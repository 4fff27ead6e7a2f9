"""Chance levels: what each metric would read for a scorer that ranks the candidates uniformly at random.

Each task declares them for a record (``TaskResult.chance``, ``"chance"`` in results.json) from the sizes of its
candidate pools (and, for NDCG, the relevances), in the metric's own units (percent for R@k, MRR and NDCG, a
1-based rank for mean/median rank). A metric with no chance level (BLEU, CIDEr, ...) is absent. The report shows
them beside our numbers on data that is not the paper's, where a difference to the paper means nothing.

For a query whose target is one of ``n`` candidates ranked uniformly at random, its rank is uniform on 1..n:
``R@k = min(k, n) / n``, ``E[1/rank] = H_n / n`` (H_n the n-th harmonic number), ``E[rank] = (n + 1) / 2``.
A record's chance level is the mean over its queries (pools may differ per query, e.g. VIST's masked context
photos). For NDCG@k of a random permutation each of the top k positions holds a relevance whose expectation is
the mean relevance, so ``E[DCG@k] = mean(rel) * sum_{i=1..k} 1/log2(i+1)``; the ideal DCG is fixed.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence


def _mean_over(pool_sizes: Iterable[int], value) -> float:
    """mean of value(n) over the queries' pool sizes, computed once per distinct size."""
    counts = Counter(int(n) for n in pool_sizes)
    if not counts or min(counts) < 1:
        raise ValueError("pool sizes must be >= 1 and there must be at least one query")
    total = sum(counts.values())
    return sum(value(n) * c for n, c in counts.items()) / total


def harmonic(n: int) -> float:
    return math.fsum(1.0 / i for i in range(1, n + 1))


def recall_chance(pool_sizes: Iterable[int], k: int) -> float:
    """R@k (percent) of a uniform random ranking, each query's target among its pool."""
    return 100.0 * _mean_over(pool_sizes, lambda n: min(k, n) / n)


def mrr_chance(pool_sizes: Iterable[int]) -> float:
    """MRR (percent) of a uniform random ranking: mean of H_n / n."""
    return 100.0 * _mean_over(pool_sizes, lambda n: harmonic(n) / n)


def mean_rank_chance(pool_sizes: Iterable[int]) -> float:
    return _mean_over(pool_sizes, lambda n: (n + 1) / 2)


def rank_chance(pool_sizes: Sequence[int], ks: Iterable[int], prefix: str = "", mrr: bool = True,
                median: bool = False) -> dict[str, float]:
    """The chance levels of a ranking task's usual metrics: `{prefix}R@k`, `MRR`, `{prefix}mean_rank` and, where
    every query has the same pool (so the median rank of a random ranking is (n + 1) / 2), `{prefix}median_rank`."""
    sizes = list(pool_sizes)
    if not sizes:
        return {}
    out = {f"{prefix}R@{k}": recall_chance(sizes, k) for k in ks}
    if mrr:
        out[f"{prefix}MRR"] = mrr_chance(sizes)
    out[f"{prefix}mean_rank"] = mean_rank_chance(sizes)
    if median and len(set(sizes)) == 1:
        out[f"{prefix}median_rank"] = (sizes[0] + 1) / 2
    return out


def best_of_recall_chance(pools: Iterable[tuple[int, int]], k: int) -> float:
    """R@k (percent) when a query has `m` correct candidates among `n` and counts its best-ranked one (i2t with
    several captions per image): 1 - P(none of the m in the random top k) = 1 - prod_j (n-k-j)/(n-j)."""
    def hit(n: int, m: int) -> float:
        miss = 1.0
        for j in range(m):
            miss *= max(0, n - k - j) / (n - j)
        return 1.0 - miss

    pools = list(pools)
    if not pools:
        raise ValueError("no queries")
    return 100.0 * math.fsum(hit(n, m) for n, m in pools) / len(pools)


def best_of_mean_rank_chance(pools: Iterable[tuple[int, int]]) -> float:
    """E[best rank] of m correct candidates among n in a random order: (n + 1) / (m + 1)."""
    pools = list(pools)
    return math.fsum((n + 1) / (m + 1) for n, m in pools) / len(pools)


def ndcg_chance(relevances: Iterable[Sequence[float]]) -> float:
    """Expected VisDial NDCG (percent, as `tasks.metrics.visdial_ndcg`: k = the options with non-zero relevance,
    all-zero rounds left out) of a uniform random ranking of each round's options; nan without a round."""
    values = []
    for rel in relevances:
        rel = [float(r) for r in rel]
        k = sum(1 for r in rel if r != 0)
        if k == 0:
            continue
        discount = [1.0 / math.log2(i + 2) for i in range(k)]
        ideal = math.fsum(r * d for r, d in zip(sorted(rel, reverse=True), discount))
        values.append(math.fsum(rel) / len(rel) * math.fsum(discount) / ideal)
    return 100.0 * math.fsum(values) / len(values) if values else math.nan
