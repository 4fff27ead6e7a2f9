"""Standard errors and 95 % intervals of every metric, by a seeded bootstrap over the examples of a record.

Each metric of an eval record is recomputed from the record's per-example predictions (`predictions/*.jsonl`):
a rank-based metric from each example's `rank` (R@k: 100 x [rank <= k]; MRR: 100 / rank; mean_rank: the
mean; median_rank: the median), VisDial NDCG from each annotated round's `ndcg`, captioning ROUGE-L and CIDEr
from each image's score (the corpus figure is their mean; CIDEr's document frequencies stay those of the whole
reference set), corpus BLEU-n recomputed from the resampled images' summed n-gram statistics (`bleu_stats`).
Corpus METEOR is not a mean of per-image scores and its statistics stay inside the Java scorer: `not_available`.

The resampled unit is the cluster that examples share (`Examples.unit`): a story, a dialogue (its ten rounds
are resampled together, as they share an image and a history), an image with its captions. A resample draws
`RESAMPLES` clusters with replacement (numpy's PCG64 seeded with `SEED`); the standard error is the standard
deviation of the resampled metric (ddof 1) and the interval is the 2.5th to 97.5th percentile (the percentile
bootstrap). A metric the full sample does not reproduce (a task whose predictions changed shape) is
`not_available` with the two values, rather than given an interval of something else.

`paired_differences` is the paired test `fromage-bench compare` uses: the same resampled clusters for both
runs, over the examples both runs share (joined by example id).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
METHOD = "bootstrap"
RANK_METRIC = re.compile(r"^(?:(?P<direction>t2i|i2t)_)?(?:R@(?P<k>\d+)|(?P<name>MRR|mean_rank|median_rank))$")
CORPUS_ONLY = {"METEOR"}
MEAN_OF_SCORES = ("ROUGE-L", "CIDEr")
REPRODUCE_TOLERANCE = 1e-6  # relative: the predictions' JSON floats against the task's metric


@dataclass
class Examples:
    """One record's per-example values. Rows are the finest examples (a story, a VisDial round, a caption
    query); each row belongs to a cluster, the resampled unit. A metric is `values[metric]` averaged over the
    rows with `weights[metric]` 1 (0: the row does not count for it, e.g. an unannotated round for NDCG), or
    their median for the metrics in `medians`."""
    unit: str
    row_ids: list[str]
    clusters: list[str]                      # cluster id of each row
    values: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    medians: set[str] = field(default_factory=set)
    not_available: dict[str, str] = field(default_factory=dict)
    # corpus metrics: metric -> (per-row statistics (rows x s), f(summed statistics (resamples x s)) -> metric)
    corpus: dict[str, tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]] = field(default_factory=dict)

    def subset(self, rows: list[int]) -> "Examples":
        index = np.asarray(rows, dtype=int)
        return Examples(self.unit, [self.row_ids[i] for i in rows], [self.clusters[i] for i in rows],
                        {m: v[index] for m, v in self.values.items()}, {m: w[index] for m, w in self.weights.items()},
                        set(self.medians), dict(self.not_available),
                        {m: (stats[index], f) for m, (stats, f) in self.corpus.items()})

    def metrics(self) -> set[str]:
        return set(self.values) | set(self.corpus)


# -- per-example values from a task's predictions ----------------------------------------------------------
def _rank_metric(metric: str, ranks: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """(per-row value, is a median) of a rank-based metric name, or None if the name is not one."""
    match = RANK_METRIC.match(metric)
    if match is None:
        return None
    if match["k"]:
        return 100.0 * (ranks <= int(match["k"])), False
    name = match["name"]
    if name == "MRR":
        return 100.0 / ranks, False
    return ranks.astype(float), name == "median_rank"


def _from_ranks(examples: Examples, predictions: list[dict], metrics: list[str],
                direction_of: Callable[[dict], str | None] = lambda p: None) -> None:
    ranks = np.array([float(p["rank"]) for p in predictions])
    directions = [direction_of(p) for p in predictions]
    for metric in metrics:
        found = _rank_metric(metric, ranks)
        if found is None:
            continue
        values, is_median = found
        wanted = RANK_METRIC.match(metric)["direction"]
        examples.values[metric] = values
        examples.weights[metric] = np.array([1.0 if d == wanted else 0.0 for d in directions])
        if is_median:
            examples.medians.add(metric)


def _vist(predictions: list[dict], metrics: list[str]) -> Examples:
    ids = [str(p["story_id"]) for p in predictions]
    examples = Examples("story", ids, ids)
    _from_ranks(examples, predictions, metrics)
    return examples


def _visdial_retrieval(predictions: list[dict], metrics: list[str]) -> Examples:
    ids = [f"{p['dialogue']}:{p['image_id']}" for p in predictions]
    examples = Examples("dialogue", ids, ids)
    _from_ranks(examples, predictions, metrics)
    return examples


def _visdial_ranking(predictions: list[dict], metrics: list[str]) -> Examples:
    examples = Examples("dialogue (its rounds together)", [f"{p['dialogue']}:{p['round_id']}" for p in predictions],
                        [f"{p['dialogue']}:{p['image_id']}" for p in predictions])
    _from_ranks(examples, predictions, metrics)
    if "NDCG" in metrics:
        if predictions and all("ndcg" in p for p in predictions):
            ndcg = [p["ndcg"] for p in predictions]
            examples.values["NDCG"] = np.array([float(v) if v is not None else 0.0 for v in ndcg])
            examples.weights["NDCG"] = np.array([1.0 if v is not None else 0.0 for v in ndcg])
        else:
            examples.not_available["NDCG"] = "the predictions hold no per-round ndcg (written before 2026-12-01)"
    return examples


def _image_text(predictions: list[dict], metrics: list[str]) -> Examples:
    """Captions are resampled with their image: COCO's five captions of an image are not independent."""
    ids = [f"t2i:{p['caption_index']}" if p["direction"] == "t2i" else f"i2t:{p['image_id']}" for p in predictions]
    clusters = [str(p["target"] if p["direction"] == "t2i" else p["image_id"]) for p in predictions]
    examples = Examples("image (with its captions)", ids, clusters)
    _from_ranks(examples, predictions, metrics, direction_of=lambda p: p["direction"])
    return examples


def corpus_bleu(n: int) -> Callable[[np.ndarray], np.ndarray]:
    """BLEU-n x 100 from summed statistics [testlen, reflen, guess_1..4, correct_1..4], pycocoevalcap's formula:
    the geometric mean of the n-gram precisions (with its tiny / small guards), times the brevity penalty."""
    tiny, small = 1e-15, 1e-9

    def bleu(sums: np.ndarray) -> np.ndarray:
        precision = np.prod([(sums[:, 6 + k] + tiny) / (sums[:, 2 + k] + small) for k in range(n)], axis=0)
        score = precision ** (1.0 / n)
        ratio = (sums[:, 0] + tiny) / (sums[:, 1] + small)
        with np.errstate(divide="ignore", over="ignore"):
            penalty = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
        return 100.0 * score * penalty
    return bleu


def _captioning(predictions: list[dict], metrics: list[str]) -> Examples:
    ids = [f"{i}:{p['image_id']}" for i, p in enumerate(predictions)]
    examples = Examples("image", ids, ids)
    ones = np.ones(len(predictions))
    has_stats = bool(predictions) and all("bleu_stats" in p for p in predictions)
    if has_stats:
        stats = np.array([[s["testlen"], s["reflen"], *s["guess"], *s["correct"]]
                          for s in (p["bleu_stats"] for p in predictions)], dtype=float)
    for metric in metrics:
        if metric in MEAN_OF_SCORES and all(metric in (p.get("scores") or {}) for p in predictions):
            examples.values[metric] = np.array([float(p["scores"][metric]) for p in predictions])
            examples.weights[metric] = ones
        elif metric.startswith("BLEU-") and has_stats:
            examples.corpus[metric] = (stats, corpus_bleu(int(metric.split("-")[1])))
        elif metric.startswith("BLEU-"):
            examples.not_available[metric] = "the predictions hold no per-image BLEU statistics (before 2026-12-01)"
        elif metric in CORPUS_ONLY:
            examples.not_available[metric] = ("METEOR's corpus score aggregates alignment statistics inside the "
                                              "Java scorer: not a mean of the per-image scores")
    return examples


BUILDERS: dict[str, Callable[[list[dict], list[str]], Examples]] = {
    "vist_retrieval": _vist, "visdial_retrieval": _visdial_retrieval, "visdial_ranking": _visdial_ranking,
    "image_text_retrieval": _image_text, "captioning": _captioning}


def numeric_metrics(record: dict) -> list[str]:
    return [m for m, v in (record.get("metrics") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]


def examples_of(record: dict, predictions: list[dict]) -> Examples:
    """The per-example values of a record's metrics, each checked to reproduce the record's figure."""
    metrics = numeric_metrics(record)
    builder = BUILDERS.get(record.get("task"))
    if builder is None:
        return Examples("example", [], [], not_available={m: f"no per-example form for task {record.get('task')!r}"
                                                         for m in metrics})
    try:
        examples = builder(predictions, metrics)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        return Examples("example", [], [], not_available={m: f"predictions lack a per-example field ({err})"
                                                         for m in metrics})
    full = statistics(examples, np.ones((1, len(set(examples.clusters)))))
    for metric in metrics:
        if metric in examples.metrics():
            got, want = float(full[metric][0]), float(record["metrics"][metric])
            if not math.isclose(got, want, rel_tol=REPRODUCE_TOLERANCE, abs_tol=1e-9):
                examples.not_available[metric] = f"the predictions give {got:.6g}, the record {want:.6g}"
                for table in (examples.values, examples.weights, examples.corpus):
                    table.pop(metric, None)
        elif metric not in examples.not_available:
            examples.not_available[metric] = "no per-example value for this metric"
    return examples


# -- resampling --------------------------------------------------------------------------------------------
def cluster_index(examples: Examples) -> tuple[np.ndarray, int]:
    """Each row's cluster as 0..K-1 (in order of first appearance) and K."""
    order: dict[str, int] = {}
    index = np.array([order.setdefault(c, len(order)) for c in examples.clusters], dtype=int)
    return index, len(order)


def resample_counts(n_clusters: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n_clusters): how often each cluster is drawn in each resample (n_clusters draws each)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    draws = rng.integers(0, n_clusters, size=(resamples, n_clusters))
    counts = np.zeros((resamples, n_clusters))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    return counts


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row of `weights` (resamples x rows, integer counts): the median of `values` repeated that often,
    the mean of the two middle values for an even total (as tasks.metrics.median_rank)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    cumulative = np.cumsum(weights[:, order], axis=1)
    total = cumulative[:, -1]
    out = np.full(weights.shape[0], np.nan)
    ok = total > 0
    low = np.argmax(cumulative > ((total - 1) // 2)[:, None], axis=1)
    high = np.argmax(cumulative > (total // 2)[:, None], axis=1)
    out[ok] = (sorted_values[low[ok]] + sorted_values[high[ok]]) / 2.0
    return out


def statistics(examples: Examples, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric under each row of cluster `counts` (resamples x clusters); NaN where no row counts."""
    index, _ = cluster_index(examples)
    row_counts = counts[:, index] if len(index) else np.zeros((counts.shape[0], 0))
    out = {}
    for metric, values in examples.values.items():
        weights = row_counts * examples.weights[metric]
        if metric in examples.medians:
            out[metric] = _weighted_median(values, weights)
            continue
        total = weights.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[metric] = np.where(total > 0, weights @ values / np.where(total > 0, total, 1.0), np.nan)
    for metric, (stats, corpus_metric) in examples.corpus.items():
        out[metric] = corpus_metric(row_counts @ stats)
    return out


def _interval(replicates: np.ndarray) -> tuple[float, list[float]] | None:
    finite = replicates[np.isfinite(replicates)]
    if finite.size < 2:
        return None
    tail = 100.0 * (1.0 - LEVEL) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(np.std(finite, ddof=1)), [float(low), float(high)]


def uncertainty(record: dict, predictions: list[dict], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The record's `uncertainty` block (docs/results-schema.md)."""
    examples = examples_of(record, predictions)
    _, n_clusters = cluster_index(examples)
    block: dict[str, Any] = {"method": METHOD, "resamples": resamples, "seed": seed, "unit": examples.unit,
                             "n_units": n_clusters, "interval": "percentile", "stderr": {}, "ci95": {}}
    not_available = dict(examples.not_available)
    if n_clusters >= 2:
        for metric, replicates in statistics(examples, resample_counts(n_clusters, resamples, seed)).items():
            found = _interval(replicates)
            if found is None:
                not_available[metric] = "too few examples count for it"
                continue
            block["stderr"][metric], block["ci95"][metric] = found
    else:
        not_available.update({m: f"{n_clusters} {examples.unit}(s): nothing to resample"
                              for m in examples.metrics()})
    if not_available:
        block["not_available"] = not_available
    return block


@dataclass
class Difference:
    """NEW minus BASE of one metric over the shared examples, with its paired bootstrap interval."""
    metric: str
    base: float
    new: float
    delta: float
    ci95: tuple[float, float] | None
    shared: int          # clusters in both runs


def paired_differences(base: Examples, new: Examples, resamples: int = RESAMPLES, seed: int = SEED
                       ) -> tuple[dict[str, Difference], int]:
    """The differences of the metrics both runs have, over the rows both hold (by row id), each resample
    drawing the same clusters for both runs. Returns ({metric: Difference}, shared clusters)."""
    new_rows = {rid: i for i, rid in enumerate(new.row_ids)}
    pairs = [(i, new_rows[rid]) for i, rid in enumerate(base.row_ids) if rid in new_rows]
    shared_base = base.subset([i for i, _ in pairs])
    shared_new = new.subset([j for _, j in pairs])
    shared_new.clusters = list(shared_base.clusters)  # one cluster structure for both sides: BASE's
    _, n_clusters = cluster_index(shared_base)
    if n_clusters == 0:
        return {}, 0
    full = np.ones((1, n_clusters))
    counts = resample_counts(n_clusters, resamples, seed)
    point_base, point_new = statistics(shared_base, full), statistics(shared_new, full)
    rep_base, rep_new = statistics(shared_base, counts), statistics(shared_new, counts)
    out = {}
    for metric in point_base.keys() & point_new.keys():
        replicates = rep_new[metric] - rep_base[metric]
        found = _interval(replicates) if n_clusters >= 2 else None
        b, n = float(point_base[metric][0]), float(point_new[metric][0])
        out[metric] = Difference(metric, b, n, n - b, tuple(found[1]) if found else None, n_clusters)
    return out, n_clusters
