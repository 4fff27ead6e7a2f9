"""Ranking metrics used by the fromage-bench evaluation protocols.

All functions are pure torch and accept torch tensors or array-likes (lists, numpy arrays).

Conventions
-----------
* Scores are "higher is better". ``-inf`` is allowed and marks a masked candidate; NaN is rejected.
* Ranks are 1-based. Ties are broken by column index: a candidate that ties with the target ranks
  ahead of it iff its column index is lower, i.e.::

      rank = 1 + #{c : s[c] > s[t]} + #{c < t : s[c] == s[t]}

  This is deterministic and does not depend on the stability of any sort.  The same order
  (score descending, then column index ascending) is used to rank options in :func:`visdial_ndcg`.
* Rank-based summaries (recall, MRR) are percentages in ``[0, 100]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "ranks_from_scores",
    "recall_at_k",
    "mean_reciprocal_rank",
    "mean_rank",
    "median_rank",
    "visdial_ndcg",
    "retrieval_metrics",
]


# Max number of pairwise comparisons materialised at once by _order_from_scores.
_PAIRWISE_BUDGET = 1 << 24


def _as_float_2d(x: Any, name: str) -> torch.Tensor:
    """Convert ``x`` to a floating 2-D tensor, rejecting NaN."""
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column")
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    return t


def _as_ranks(ranks: Any) -> torch.Tensor:
    """Convert ``ranks`` to a flat float64 tensor of valid (>= 1, finite) ranks."""
    r = torch.as_tensor(ranks).reshape(-1).to(torch.float64)
    if r.numel() == 0:
        raise ValueError("ranks must be non-empty")
    if not torch.isfinite(r).all() or (r < 1).any():
        raise ValueError("ranks must be finite and >= 1 (1-based)")
    return r


def _order_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Column indices of each row ordered by score descending, ties by column index ascending.

    Implemented with the explicit ranks of every column (the tie rule of
    :func:`ranks_from_scores`), which form a permutation of the columns in every row, so the result does
    not depend on sort stability.
    """
    n, c = scores.shape
    lower_idx = torch.ones(c, c, dtype=torch.bool, device=scores.device).tril(diagonal=-1)  # [j, c]: c < j
    cols = torch.arange(c, device=scores.device)
    order = torch.empty(n, c, dtype=torch.long, device=scores.device)
    # Pairwise comparisons cost (rows, C, C); process rows in chunks to bound memory.
    chunk = max(1, _PAIRWISE_BUDGET // max(1, c * c))
    for start in range(0, n, chunk):
        s = scores[start : start + chunk]
        s_j = s.unsqueeze(2)  # candidate being ranked
        s_c = s.unsqueeze(1)  # competitor
        higher = (s_c > s_j).sum(dim=2)  # [i, j] = #{c: s[c] > s[j]}
        tied_before = ((s_c == s_j) & lower_idx).sum(dim=2)  # [i, j] = #{c < j: s[c] == s[j]}
        all_ranks = higher + tied_before  # 0-based, a permutation of 0..C-1 per row
        order[start : start + chunk].scatter_(1, all_ranks, cols.expand(s.shape[0], c))
    return order


def ranks_from_scores(scores: Any, targets: Any) -> torch.LongTensor:
    """1-based rank of the target column in each row of a score matrix.

    Args:
        scores: ``(N, C)`` scores, higher is better; ``-inf`` marks masked candidates.
        targets: ``(N,)`` integer column index of the correct candidate in each row.

    Returns:
        ``(N,)`` ``torch.long`` tensor of ranks in ``[1, C]``.

    Ties are broken by column index (deterministic, independent of sort stability)::

        rank = 1 + #{c : s[c] > s[t]} + #{c < t : s[c] == s[t]}

    so among tied candidates the lowest column index ranks first.  Masked ``-inf`` candidates tie
    with each other and only matter if the target itself is ``-inf``.

    Raises:
        ValueError: on NaN scores, wrong shapes, or out-of-range targets.
    """
    s = _as_float_2d(scores, "scores")
    t = torch.as_tensor(targets, device=s.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError("targets must be integer column indices")
    t = t.reshape(-1).to(torch.long)
    n, c = s.shape
    if t.numel() != n:
        raise ValueError(f"targets has {t.numel()} entries but scores has {n} rows")
    if n and ((t < 0).any() or (t >= c).any()):
        raise ValueError(f"targets must be in [0, {c})")
    target_scores = s.gather(1, t.unsqueeze(1))  # (N, 1)
    higher = (s > target_scores).sum(dim=1)
    cols = torch.arange(c, device=s.device).unsqueeze(0)
    tied_before = ((s == target_scores) & (cols < t.unsqueeze(1))).sum(dim=1)
    return (1 + higher + tied_before).to(torch.long)


def recall_at_k(ranks: Any, ks: int | Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k: percentage (0-100) of queries whose 1-based rank is ``<= k``.

    ``k`` may exceed the pool size (then every valid rank counts, giving 100).

    Args:
        ranks: 1-based ranks, any shape (flattened); must be non-empty.
        ks: one positive integer or an iterable of them.

    Returns:
        ``{k: recall_percentage}`` in the order given.
    """
    r = _as_ranks(ranks)
    ks_list = list(ks) if isinstance(ks, Iterable) else [ks]
    out: dict[int, float] = {}
    for k in ks_list:
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        out[k] = float((r <= k).to(torch.float64).mean().item() * 100.0)
    return out


def mean_reciprocal_rank(ranks: Any) -> float:
    """Mean reciprocal rank as a percentage in ``(0, 100]`` (``100 * mean(1 / rank)``)."""
    r = _as_ranks(ranks)
    return float((1.0 / r).mean().item() * 100.0)


def mean_rank(ranks: Any) -> float:
    """Arithmetic mean of the 1-based ranks."""
    return float(_as_ranks(ranks).mean().item())


def median_rank(ranks: Any) -> float:
    """Median of the 1-based ranks.

    For an even number of ranks this is the mean of the two middle values (unlike
    ``torch.median``, which returns the lower one).
    """
    r = torch.sort(_as_ranks(ranks)).values
    n = r.numel()
    mid = n // 2
    if n % 2:
        return float(r[mid].item())
    return float(((r[mid - 1] + r[mid]) / 2.0).item())


def visdial_ndcg(scores: Any, relevance: Any) -> float:
    """VisDial v1.0 NDCG (as the official challenge computes it), as a percentage 0-100.

    For each round (row):

    * ``k`` = number of options with non-zero relevance;
    * options are ranked by score, descending, ties broken by option index (lower first; same
      convention as :func:`ranks_from_scores`);
    * ``DCG = sum_{i=1..k} rel[option at rank i] / log2(i + 1)``;
    * ``IDCG`` = the same sum over the relevances sorted in descending order (top-k);
    * ``NDCG = DCG / IDCG``.

    Rounds whose relevance is all zero have no defined NDCG and are **skipped** (the reference
    implementation would produce 0/0 = NaN for them).  The result is the mean over the remaining
    rounds times 100, or ``nan`` if no round remains.

    Args:
        scores: ``(N, C)`` option scores (VisDial: ``C = 100``), higher is better.
        relevance: ``(N, C)`` non-negative dense relevance (VisDial ``gt_relevance``).
    """
    s = _as_float_2d(scores, "scores")
    rel = torch.as_tensor(relevance, device=s.device).to(torch.float64)
    if rel.shape != s.shape:
        raise ValueError(f"relevance shape {tuple(rel.shape)} != scores shape {tuple(s.shape)}")
    if not torch.isfinite(rel).all() or (rel < 0).any():
        raise ValueError("relevance must be finite and non-negative")

    k = (rel != 0).sum(dim=1)  # (N,)
    keep = k > 0
    if not keep.any():
        return math.nan
    s, rel, k = s[keep], rel[keep], k[keep]
    c = s.shape[1]

    positions = torch.arange(c, device=s.device)
    discounts = 1.0 / torch.log2(positions.to(torch.float64) + 2.0)  # 1/log2(rank+1), rank 1-based
    in_top_k = positions.unsqueeze(0) < k.unsqueeze(1)  # (N, C)
    weights = discounts.unsqueeze(0) * in_top_k

    ranked_rel = rel.gather(1, _order_from_scores(s))
    ideal_rel = torch.sort(rel, dim=1, descending=True).values
    dcg = (ranked_rel * weights).sum(dim=1)
    idcg = (ideal_rel * weights).sum(dim=1)
    return float((dcg / idcg).mean().item() * 100.0)


def retrieval_metrics(
    scores: Any, targets: Any, ks: int | Iterable[int] = (1, 5, 10)
) -> dict[str, float]:
    """Standard retrieval summary from a score matrix.

    Args:
        scores: ``(N, C)`` scores, higher is better (see :func:`ranks_from_scores`).
        targets: ``(N,)`` column index of the correct candidate per row.
        ks: cut-offs for recall.

    Returns:
        ``{"R@k": ..., "MRR": ..., "mean_rank": ..., "median_rank": ...}`` with ``R@k`` and
        ``MRR`` in percent and ranks 1-based.
    """
    ranks = ranks_from_scores(scores, targets)
    out = {f"R@{k}": v for k, v in recall_at_k(ranks, ks).items()}
    out["MRR"] = mean_reciprocal_rank(ranks)
    out["mean_rank"] = mean_rank(ranks)
    out["median_rank"] = median_rank(ranks)
    return out
