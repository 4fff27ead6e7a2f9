"""VisDial v1.0 val (paper Table 2): dialogue -> image retrieval, and ranking the 100 answer options of
every round given the image and the dialogue so far.

Protocols (both computed in one invocation; the expensive work is shared). Images: `paper` squashes them as the
original scripts do (resize to 224x224, then RGB), `corrected` centre-crops them as the model was trained
(`model.images`); each protocol gets its own features (both cached).

`visdial_retrieval`
  * paper: as the original script. Query text "Q: {q}? A: {a}." for every round, joined by spaces, then
    `[RET]` (no caption; tokenised with BOS); its embedding is the normalised `[RET]` output. The original
    builds `scores = image_embs @ text_embs.T` with the raw (not normalised) retrieval-mapped image
    embeddings and ranks along rows: for each IMAGE it ranks the dialogues (image -> text), although the
    paper's table describes text -> image.
  * corrected: for each dialogue, rank the images (text -> image) by cosine similarity.

`visdial_ranking`
  * paper: as the original script. Context = image (captioning mapping) + "Q: q1?\\nA: a1\\n...Q: qk?\\nA: "
    (tokenised with BOS); each option tokenised with its own BOS, scored WITHOUT the next-token shift
    (each position's logits against the token at that position) and summed, each token's loss and the sum
    rounded to the logits' dtype (the original's bf16 cross-entropy and sum); ranked in the tie order of the
    original's `topk(100)` (MRR, R@k) and `sort` (NDCG); dense annotations read at the flat round index
    `i * 10 + round_id` (the 1-based round id used as a 0-based index: one round late, and round 10 spills
    into the next dialogue's first round).
  * corrected: context ending at "\\nA:" and options scored as " " + option (so no lone-space token sits
    between them), without BOS, next-token (shifted) float32 log-probabilities averaged over the option's
    tokens, ties by option index; dense annotations at round `round_id - 1` of dialogue i (the VisDial
    challenge's definition).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from model.datasets import ImageDir
from model.errors import FromageInputError, read_json
from model.family import IMAGE_RETRIEVAL, LM_PROMPTS, SCORE_CONTINUATIONS, family_of, has, retrieval_token_of
from model.images import SQUASH
from model.scoring import EncodedContext

from .base import RunContext, Skipped, Task, TaskResult, limited, register
from .cache import load_features_per_preprocess
from .chance import ndcg_chance, rank_chance
from .metrics import ranks_from_scores, recall_at_k, mean_rank, mean_reciprocal_rank, median_rank, visdial_ndcg

DIALOGS_FILE = "visdial/visdial_1.0_val.json"
DENSE_FILE = "visdial/visdial_1.0_val_dense_annotations.json"
IMAGE_DIR = "visdial/VisualDialog_val2018"
IMAGE_PREFIX = "VisualDialog_val2018_"
N_OPTIONS = 100
ROUNDS_PER_DIALOGUE = 10  # VisDial v1.0 val; the original's flat index `i * 10 + round_id` assumes it
RET = "[RET]"
PROTOCOLS = ("paper", "corrected")
log = logging.getLogger(__name__)


# -- data -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Round:
    question: str
    answer: str
    options: tuple[str, ...]  # the 100 answer-option texts
    gt_index: int             # position of the ground-truth answer among the options


@dataclass(frozen=True)
class Dialogue:
    index: int      # position in the file
    image_id: int
    caption: str
    rounds: tuple[Round, ...]


@dataclass(frozen=True)
class DenseAnnotation:
    dialogue: int   # index of the dialogue it belongs to (the file is aligned with the dialogues)
    image_id: int
    round_id: int   # 1-based, as in the file
    relevance: tuple[float, ...]


def _read_json(path: Path) -> Any:
    return read_json(path, hint="see `fromage-bench tasks` for the expected layout under --data-root")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_dialogues(path: Path) -> list[Dialogue]:
    """All dialogues of `visdial_1.0_val.json`, with question/answer indices resolved to text."""
    path = Path(path)
    doc = _read_json(path)
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise FromageInputError(path, "not a VisDial file: expected an object with a 'data' object")
    for key in ("questions", "answers", "dialogs"):
        if not isinstance(data.get(key), list):
            raise FromageInputError(path, f"not a VisDial file: 'data.{key}' must be a list")
    questions, answers = data["questions"], data["answers"]
    for key, texts in (("questions", questions), ("answers", answers)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise FromageInputError(path, f"data.{key}[{bad}] is not a string")

    def text(table: list[str], key: str, index: Any, where: str) -> str:
        if not _is_int(index) or not 0 <= index < len(table):
            raise FromageInputError(path, f"{where}: {key} index {index!r} outside 0..{len(table) - 1}")
        return table[index]

    dialogues = []
    for i, d in enumerate(data["dialogs"]):
        where = f"data.dialogs[{i}]"
        if not isinstance(d, dict) or not _is_int(d.get("image_id")) or not isinstance(d.get("dialog"), list):
            raise FromageInputError(path, f"{where}: expected an object with an integer 'image_id' and a 'dialog' list")
        if d["image_id"] < 0:
            raise FromageInputError(path, f"{where}: negative image_id {d['image_id']}")
        if not d["dialog"]:
            raise FromageInputError(path, f"{where}: the dialogue has no rounds")
        rounds = []
        for r, turn in enumerate(d["dialog"]):
            at = f"{where}.dialog[{r}]"
            if not isinstance(turn, dict):
                raise FromageInputError(path, f"{at}: expected an object")
            options = turn.get("answer_options")
            if not isinstance(options, list) or len(options) != N_OPTIONS:
                n = len(options) if isinstance(options, list) else "no"
                raise FromageInputError(path, f"{at}: {n} answer options, expected {N_OPTIONS}")
            gt = turn.get("gt_index")
            if not _is_int(gt) or not 0 <= gt < N_OPTIONS:
                raise FromageInputError(path, f"{at}: gt_index {gt!r} outside 0..{N_OPTIONS - 1}")
            rounds.append(Round(question=text(questions, "question", turn.get("question"), at),
                                answer=text(answers, "answer", turn.get("answer"), at),
                                options=tuple(text(answers, "answer option", o, at) for o in options),
                                gt_index=gt))
        caption = d.get("caption", "")
        dialogues.append(Dialogue(i, d["image_id"], caption if isinstance(caption, str) else "", tuple(rounds)))
    return dialogues


def load_dense(path: Path, dialogues: Sequence[Dialogue]) -> list[DenseAnnotation]:
    """The dense annotations, checked to be aligned with the dialogues (one per dialogue, same order)."""
    path = Path(path)
    doc = _read_json(path)
    if not isinstance(doc, list):
        raise FromageInputError(path, "not a VisDial dense-annotation file: expected a list")
    if len(doc) != len(dialogues):
        raise FromageInputError(path, f"{len(doc)} dense annotations for {len(dialogues)} dialogues: not aligned "
                                      "with the dialogue file")
    out = []
    for i, (a, d) in enumerate(zip(doc, dialogues)):
        where = f"[{i}]"
        if not isinstance(a, dict):
            raise FromageInputError(path, f"{where}: expected an object")
        if a.get("image_id") != d.image_id:
            raise FromageInputError(path, f"{where}: image_id {a.get('image_id')!r} but dialogue {i} shows image "
                                          f"{d.image_id}: not aligned with the dialogue file")
        round_id = a.get("round_id")
        if not _is_int(round_id) or not 1 <= round_id <= len(d.rounds):
            raise FromageInputError(path, f"{where}: round_id {round_id!r} outside 1..{len(d.rounds)}")
        relevance = a.get("gt_relevance", a.get("relevance"))
        if (not isinstance(relevance, list) or len(relevance) != N_OPTIONS
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                           for x in relevance)):
            raise FromageInputError(path, f"{where}: gt_relevance must be {N_OPTIONS} non-negative numbers")
        out.append(DenseAnnotation(i, d.image_id, round_id, tuple(float(x) for x in relevance)))
    return out


def image_paths(image_dir: ImageDir, dialogues: Sequence[Dialogue]) -> list[Path | None]:
    """`VisualDialog_val2018_{image_id:012d}.jpg` (a .png of the same name is accepted too), None if absent."""
    return [image_dir.find(f"{IMAGE_PREFIX}{d.image_id:012d}") for d in dialogues]


def _readable(ctx: RunContext, image_dir: Path, dialogues: Sequence[Dialogue], preprocessings: Sequence[str]
              ) -> tuple[dict[str, dict[int, torch.Tensor]], list[Dialogue], Skipped]:
    """Pooled CLIP features by image preprocessing, then by dialogue position; the dialogues kept (image
    readable) and those skipped for their image."""
    features, failures = load_features_per_preprocess(ctx.model, image_paths(ImageDir(image_dir), dialogues),
                                                      preprocessings, ctx.cache, ctx.batch_size, ctx.image_workers)
    skipped = Skipped()
    for i in sorted(failures):
        skipped.add(failures[i], f"dialogue {i} (image {dialogues[i].image_id})")
    kept = [d for i, d in enumerate(dialogues) if i not in failures]
    if not kept:
        raise FromageInputError(image_dir, f"none of the {len(dialogues)} dialogues' images could be read")
    return features, kept, skipped


# -- text -----------------------------------------------------------------------------------------------
def retrieval_text(dialogue: Dialogue, ret_token: str | None = RET) -> str:
    """The original's query: "Q: {q}? A: {a}." for every round, joined by spaces, then `[RET]` (no caption).
    `ret_token` None (CLIP): the text alone."""
    parts = []
    for rnd in dialogue.rounds:
        parts += [f"Q: {rnd.question}?", f"A: {rnd.answer}."]
    return " ".join(parts) + (ret_token or "")


def ranking_context_text(dialogue: Dialogue, round_index: int, protocol: str = "paper") -> str:
    """The context for round `round_index` (0-based): earlier rounds as "Q: q?" / "A: a" lines, the current
    question, then the protocol's answer cue (no caption): the original's "\\nA: " (paper) or "\\nA:"
    (corrected, whose options carry the space)."""
    lines = []
    for j in range(round_index):
        lines += [f"Q: {dialogue.rounds[j].question}?", f"A: {dialogue.rounds[j].answer}"]
    lines.append(f"Q: {dialogue.rounds[round_index].question}?")
    return "\n".join(lines) + SCORING[protocol].context_end


# -- protocol logic (pure) ------------------------------------------------------------------------------
def retrieval_scores(image_embs: torch.Tensor, text_embs: torch.Tensor, protocol: str) -> torch.Tensor:
    """Score matrix whose ROWS are the queries and whose target is the diagonal.

    paper: image x text with the raw image embeddings (the original's matrix: each image ranks the dialogues);
    corrected: text x image, cosine similarity (each dialogue ranks the images).
    `text_embs` are the (already normalised) `[RET]` embeddings."""
    image_embs, text_embs = image_embs.float(), text_embs.float()
    if protocol == "paper":
        return image_embs @ text_embs.T
    if protocol == "corrected":
        return F.normalize(text_embs, dim=-1) @ F.normalize(image_embs, dim=-1).T
    raise ValueError(f"unknown protocol {protocol!r}")


@dataclass(frozen=True)
class OptionScoring:
    continuation_bos: bool   # each option tokenised with its own BOS
    shift: bool              # next-token scoring (False: each position's logits vs the token at that position)
    reduce: str              # "sum" or "mean" of the option's token log-probabilities
    context_end: str         # the context's last characters, after the current question
    option_prefix: str       # put before each option's text
    original_numerics: bool  # as the original: token losses and sums rounded to the logits' dtype, its tie order
    description: str


# The original's context ends in "A: ", which an OPT tokenizer ends with a lone-space token, and its options
# start without a space (after their own BOS). Without that BOS an option would be scored right after the lone
# space, which OPT rarely sees; so the corrected context ends at "A:" and the space opens the option (" yes").
SCORING = {
    "paper": OptionScoring(True, False, "sum", "\nA: ", "", True,
                           "options with their own BOS after a context ending in 'A: ', unshifted logits, summed "
                           "log-probs, rounded in the model dtype as the original"),
    "corrected": OptionScoring(False, True, "mean", "\nA:", " ", False,
                               "' ' + option without BOS after a context ending in 'A:', next-token log-probs "
                               "(float32), mean per token"),
}


def option_scores(scores: Any, protocol: str) -> torch.Tensor:
    """Higher-is-better score per option from a `ContinuationScores` (sum_logprob, num_tokens, mean_logprob)."""
    if SCORING[protocol].reduce == "sum":
        return scores.sum_logprob.float().cpu()
    return scores.mean_logprob.float().cpu()


def dense_rounds(annotations: Sequence[DenseAnnotation], round_counts: Sequence[int],
                 protocol: str) -> list[tuple[int, int] | None]:
    """The (dialogue, 0-based round) each dense annotation is compared with, or None where the protocol's
    index falls outside the evaluated dialogues.

    paper: the original flattens all rounds of all dialogues in order and reads flat index
    `i * 10 + round_id` (round_id is 1-based): one round late, and round 10 lands on the next dialogue's
    first round; an index past the end is skipped (the original's loop stops there).
    corrected: round `round_id - 1` of dialogue i."""
    flat = [(i, r) for i, n in enumerate(round_counts) for r in range(n)]
    out: list[tuple[int, int] | None] = []
    for a in annotations:
        if a.dialogue >= len(round_counts):
            out.append(None)
        elif protocol == "paper":
            idx = a.dialogue * ROUNDS_PER_DIALOGUE + a.round_id
            out.append(flat[idx] if idx < len(flat) else None)
        elif protocol == "corrected":
            out.append((a.dialogue, a.round_id - 1) if a.round_id - 1 < round_counts[a.dialogue] else None)
        else:
            raise ValueError(f"unknown protocol {protocol!r}")
    return out


def option_order(scores: torch.Tensor, protocol: str, call: str = "topk") -> torch.Tensor:
    """All options of a round, best first.

    corrected: by score, ties by lower index (the metrics' convention). paper: in the order of the original's
    own calls on the float32 scores on CPU, ties included: `scores.topk(100)` for MRR / R@k / ranks and
    `scores[None].sort(1, descending=True)` for NDCG (`call="sort"`). Their tie orders are neither by index nor
    the same as each other (std::nth_element / std::sort in PyTorch's CPU kernels); ties are common where bf16
    rounds the summed losses, so the original's ranks depend on them."""
    scores = scores.float().cpu()
    if not SCORING[protocol].original_numerics:
        return torch.sort(scores, descending=True, stable=True).indices
    if call == "topk":
        return scores.topk(len(scores)).indices
    return scores[None].sort(1, descending=True).indices[0]


def _in_order(order: torch.Tensor) -> torch.Tensor:
    """Strictly decreasing stand-in scores that rank the options in `order` (for the metric functions)."""
    out = torch.empty(len(order))
    out[order] = -torch.arange(len(order), dtype=torch.float32)
    return out


def ranking_metrics(scores: dict[tuple[int, int], torch.Tensor], gt: dict[tuple[int, int], int],
                    annotations: Sequence[DenseAnnotation], targets: Sequence[tuple[int, int] | None],
                    protocol: str = "corrected") -> tuple[dict[str, float], dict[tuple[int, int], int], int]:
    """Metrics over the scored rounds (keys (dialogue, round)): MRR / R@k / mean rank over every scored round,
    NDCG over the dense annotations whose target round was scored, options ordered by `option_order`.
    Returns (metrics, rank by round, n NDCG rounds)."""
    keys = sorted(scores)
    matrix = torch.stack([_in_order(option_order(scores[k], protocol)) for k in keys])
    ranks = ranks_from_scores(matrix, torch.tensor([gt[k] for k in keys]))
    metrics: dict[str, float] = {}
    pairs = [(ordered, relevance) for _, ordered, relevance in _ndcg_rounds(scores, annotations, targets, protocol)]
    if pairs:
        metrics["NDCG"] = visdial_ndcg(torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]))
    else:
        metrics["NDCG"] = math.nan
    metrics["MRR"] = mean_reciprocal_rank(ranks)
    metrics.update({f"R@{k}": v for k, v in recall_at_k(ranks, (1, 5, 10, 20)).items()})
    metrics["mean_rank"] = mean_rank(ranks)
    return metrics, dict(zip(keys, ranks.tolist())), len(pairs)


def _ndcg_rounds(scores: dict[tuple[int, int], torch.Tensor], annotations: Sequence[DenseAnnotation],
                 targets: Sequence[tuple[int, int] | None], protocol: str) -> list[tuple]:
    """(round, its option scores in the protocol's order, the annotation's relevance) of each dense annotation
    whose target round was scored."""
    return [(t, _in_order(option_order(scores[t], protocol, "sort")), a.relevance)
            for a, t in zip(annotations, targets) if t is not None and t in scores]


def round_ndcg(scores: dict[tuple[int, int], torch.Tensor], annotations: Sequence[DenseAnnotation],
               targets: Sequence[tuple[int, int] | None], protocol: str) -> dict[tuple[int, int], float]:
    """Each annotated round's NDCG (the per-example values whose mean is `ranking_metrics`' NDCG)."""
    values = {t: visdial_ndcg(ordered[None], torch.tensor([relevance]))
              for t, ordered, relevance in _ndcg_rounds(scores, annotations, targets, protocol)}
    return {t: v for t, v in values.items() if v == v}  # an all-zero relevance has no NDCG (visdial_ndcg skips it)


def top_k(scores: torch.Tensor, k: int = 5, protocol: str = "corrected") -> list[int]:
    """Indices of the k best scores, in the protocol's order (`option_order`)."""
    return option_order(scores, protocol)[:k].tolist()


# -- visdial_retrieval ----------------------------------------------------------------------------------
def _dialogue_key(d: Dialogue) -> str:
    """A dialogue's journal id: its position in the file and its image."""
    return f"{d.index}:{d.image_id}"


def run_retrieval(ctx: RunContext, setting: str, protocols: tuple[str, ...]) -> list[TaskResult]:
    model = ctx.model
    dialogues = limited(load_dialogues(RETRIEVAL.path(ctx, "dialogs", setting)), ctx.limit)
    with torch.inference_mode():
        features, kept, skipped = _readable(ctx, RETRIEVAL.path(ctx, "images", setting), dialogues,
                                            [RETRIEVAL.preprocessing(p) for p in protocols])
        image_embs = {preprocess: model.project_images(torch.stack([by_index[d.index] for d in kept]),
                                                       "retrieval")[:, 0].float().cpu()
                      for preprocess, by_index in features.items()}
        size = max(1, ctx.batch_size)
        ret_token = retrieval_token_of(model)

        def embed(batch: list[Dialogue]) -> list[list[float]]:
            prompts = [[retrieval_text(d, ret_token)] for d in batch]
            return model.retrieval_embeddings(prompts, batch_size=size).float().cpu().tolist()

        # one normalised [RET] embedding per dialogue; float32 -> float -> JSON round-trips exactly
        values = ctx.map_batches("query_embeddings", kept, key=_dialogue_key, compute=embed, batch_size=size,
                                 desc="visdial_retrieval", unit="dialogue")
        text_embs = torch.tensor(values, dtype=torch.float32)

    ids = [d.image_id for d in kept]
    results = []
    for protocol in protocols:
        scores = retrieval_scores(image_embs[RETRIEVAL.preprocessing(protocol)], text_embs, protocol)
        targets = torch.arange(len(kept))
        ranks = ranks_from_scores(scores, targets)
        metrics = {f"R@{k}": v for k, v in recall_at_k(ranks, (1, 5, 10)).items()}
        metrics.update(MRR=mean_reciprocal_rank(ranks), mean_rank=mean_rank(ranks), median_rank=median_rank(ranks))
        direction = "image->text" if protocol == "paper" else "text->image"
        predictions = []
        for row, d in enumerate(kept):
            predictions.append({"image_id": d.image_id, "dialogue": d.index, "direction": direction,
                                "rank": int(ranks[row]), "top5": [ids[j] for j in top_k(scores[row])],
                                "query": (f"image {d.image_id}" if protocol == "paper"
                                          else retrieval_text(d, ret_token))})
        results.append(RETRIEVAL.result(
            setting, protocol, family_of(model), metrics=metrics, n_examples=len(kept),
            skipped=copy.deepcopy(skipped), predictions=predictions,
            chance=rank_chance([len(kept)] * len(kept), (1, 5, 10), median=True),
            extra={"direction": direction, "pool_size": len(kept),
                   "scores": ("raw retrieval image embeddings @ normalised [RET] embeddings, ranked per image"
                              if protocol == "paper" else "cosine similarity, images ranked per dialogue"),
                   "paper_baselines": {"CLIP ViT-L/14": dict(PAPER_RETRIEVAL_CLIP)}, **clip_extra(model)}))
    return results


def clip_extra(model) -> dict[str, Any]:
    """How a model without an LM (CLIP) saw the dialogue (our readings); nothing for an LM family."""
    if has(model, LM_PROMPTS):
        return {}
    from model.clip_baseline import CLIP_READINGS

    return {"clip_readings": {**CLIP_READINGS, "query_text": "the dialogue's 'Q: q? A: a.' rounds joined by spaces"}}


# -- visdial_ranking ------------------------------------------------------------------------------------
def run_ranking(ctx: RunContext, setting: str, protocols: tuple[str, ...]) -> list[TaskResult]:
    model = ctx.model
    all_dialogues = load_dialogues(RANKING.path(ctx, "dialogs", setting))
    annotations = load_dense(RANKING.path(ctx, "dense", setting), all_dialogues)
    dialogues = limited(all_dialogues, ctx.limit)
    annotations = annotations[:len(dialogues)]

    with torch.inference_mode():
        features, kept, skipped = _readable(ctx, RANKING.path(ctx, "images", setting), dialogues,
                                            [RANKING.preprocessing(p) for p in protocols])

        def score(batch: list[Dialogue]) -> list[list[dict[str, list[float]]]]:
            """Per dialogue, per round, per protocol: the 100 option scores (float32 as Python floats)."""
            out = []
            for d in batch:
                visuals = {protocol: model.project_images(features[RANKING.preprocessing(protocol)][d.index][None],
                                                          "captioning")[0]
                           for protocol in protocols}  # each protocol sees the image as its code path prepares it
                rounds, contexts = [], None
                for r in range(len(d.rounds)):
                    by_protocol, contexts = score_round(model, visuals, d, r, protocols, ctx.option_batch_size,
                                                        contexts)
                    rounds.append({protocol: values.tolist() for protocol, values in by_protocol.items()})
                out.append(rounds)
            return out

        # one dialogue per batch: its 10 rounds x 100 options x protocols are plenty of work per journal line
        # the step names each protocol's image preprocessing: a journal of another preprocessing is not reused
        step = "option_scores:" + ",".join(f"{p}/{RANKING.preprocessing(p)}" for p in protocols)
        # timed per dialogue, counted in rounds as the metrics and n_examples count them
        per_dialogue = ctx.map_batches(step, kept, key=_dialogue_key, compute=score, batch_size=1,
                                       desc="visdial_ranking", unit="round", units=lambda d: len(d.rounds))
    scores: dict[str, dict[tuple[int, int], torch.Tensor]] = {
        protocol: {(d.index, r): torch.tensor(values[protocol], dtype=torch.float32)
                   for d, rounds in zip(kept, per_dialogue) for r, values in enumerate(rounds)}
        for protocol in protocols}

    gt = {(d.index, r): rnd.gt_index for d in kept for r, rnd in enumerate(d.rounds)}
    round_counts = [len(d.rounds) for d in dialogues]
    results = []
    for protocol in protocols:
        targets = dense_rounds(annotations, round_counts, protocol)
        metrics, ranks, n_dense = ranking_metrics(scores[protocol], gt, annotations, targets, protocol)
        ndcg = round_ndcg(scores[protocol], annotations, targets, protocol)
        predictions = []
        for d in kept:
            for r, rnd in enumerate(d.rounds):
                best = top_k(scores[protocol][(d.index, r)], protocol=protocol)
                predictions.append({"image_id": d.image_id, "dialogue": d.index, "round_id": r + 1,
                                    "question": rnd.question, "gt_index": rnd.gt_index, "rank": ranks[(d.index, r)],
                                    "top5": best, "answer": rnd.answer, "predicted": rnd.options[best[0]],
                                    "ndcg": ndcg.get((d.index, r))})  # None: no dense annotation scores it
        results.append(RANKING.result(
            setting, protocol, family_of(model), metrics=metrics, n_examples=len(gt), skipped=copy.deepcopy(skipped),
            predictions=predictions, chance=ranking_chance(scores[protocol], annotations, targets),
            extra={"dialogues": len(kept), "ndcg_rounds": n_dense, "scoring": SCORING[protocol].description,
                   "dense_index": ("flat round i*10 + round_id (the original's off-by-one)" if protocol == "paper"
                                   else "round round_id - 1 of dialogue i"),
                   **RANKING_NOT_IN_PAPER.get(family_of(model), {})}))
    return results


# Families whose paper does not report the answer ranking (their records have no `paper`): say so in `extra`.
RANKING_NOT_IN_PAPER = {"gill": {"paper_note": "not in GILL's paper: GILL reports no VisDial answer ranking; its LM "
                                               "scores the options as FROMAGe's does (model/gill.py)"}}


def ranking_chance(scores: dict[tuple[int, int], torch.Tensor], annotations: Sequence[DenseAnnotation],
                   targets: Sequence[tuple[int, int] | None]) -> dict[str, float]:
    """The chance levels of `ranking_metrics`: the N_OPTIONS options of each scored round in a uniform random order,
    NDCG over the same dense annotations as the metric (those whose target round was scored)."""
    chance = rank_chance([N_OPTIONS] * len(scores), (1, 5, 10, 20))
    chance["NDCG"] = ndcg_chance(a.relevance for a, t in zip(annotations, targets) if t is not None and t in scores)
    return chance


def round_contexts(model, visuals: dict[str, torch.Tensor], dialogue: Dialogue, round_index: int,
                   protocols: Sequence[str], previous: dict[str, EncodedContext] | None = None
                   ) -> dict[str, EncodedContext]:
    """Each protocol's encoded context of a round (its image's captioning embedding `visuals[protocol]`, then its
    text), continuing from that protocol's context of the previous round (`previous`): the next round's text
    shares all of this round's corrected context ("...A:") and all but the lone-space token of the paper one
    ("...A: "). The protocols prepare the image differently (squash, crop), so they share no inputs."""
    previous = previous or {}
    return {protocol: model.encode_context([visuals[protocol], ranking_context_text(dialogue, round_index, protocol)],
                                           previous=previous.get(protocol))
            for protocol in protocols}


def score_round(model, visuals: dict[str, torch.Tensor], dialogue: Dialogue, round_index: int,
                protocols: Sequence[str], option_batch_size: int, previous: dict[str, EncodedContext] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, EncodedContext]]:
    """One round of `visdial_ranking`: its 100 option scores per protocol, and the contexts the next round
    continues from. `fromage-bench profile` times this very function (its VisDial projection)."""
    contexts = round_contexts(model, visuals, dialogue, round_index, protocols, previous)
    options = dialogue.rounds[round_index].options
    scores = {protocol: score_options(model, contexts[protocol], options, protocol, option_batch_size)
              for protocol in protocols}
    return scores, contexts


def score_options(model, context: EncodedContext, options: Sequence[str], protocol: str,
                  option_batch_size: int = N_OPTIONS) -> torch.Tensor:
    """One round's option scores, `option_batch_size` options per forward pass (halved on CUDA out of memory).
    Without BOS an empty option has no token to score: it gets -inf."""
    how = SCORING[protocol]
    usable = [j for j, o in enumerate(options) if how.continuation_bos or o]
    out = torch.full((len(options),), -math.inf)
    if usable:
        texts = [how.option_prefix + options[j] for j in usable]

        def score(size: int):
            return model.score_continuations(context, texts, continuation_bos=how.continuation_bos, shift=how.shift,
                                             batch_size=size, original_rounding=how.original_numerics)

        out[torch.tensor(usable)] = option_scores(halving_on_oom(score, option_batch_size), protocol)
    return out


def halving_on_oom(score, size: int):
    """score(size); on a CUDA out-of-memory error, free the cache and retry with half the size, down to 1.
    (The chunking changes the cost only: every option is scored on its own, whatever packs it.)"""
    while True:
        try:
            return score(size)
        except torch.OutOfMemoryError:
            if size <= 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("visdial_ranking: out of memory scoring %d options per pass, retrying with %d", size, size // 2)
            size //= 2


# -- registration ---------------------------------------------------------------------------------------
PAPER_RETRIEVAL = {"R@1": 20.8, "R@5": 44.9, "R@10": 56.0}
PAPER_RETRIEVAL_CLIP = {"R@1": 17.7, "R@5": 38.9, "R@10": 50.2}
# The reference notebook (VisDial_Inference_IT2T_Generation.ipynb) of the original code.
PAPER_RANKING = {"NDCG": 16.594, "MRR": 21.997, "R@1": 17.573, "R@5": 19.971, "R@10": 24.414, "R@20": 48.309}

RETRIEVAL = register(Task(
    name="visdial_retrieval",
    description="VisDial v1.0 val: retrieve each dialogue's image from the val images, given all 10 rounds of "
                "question/answer text (paper Table 2)",
    settings=("val",),
    protocols=PROTOCOLS,
    files={"dialogs": DIALOGS_FILE, "images": IMAGE_DIR},
    metrics=("R@1", "R@5", "R@10", "MRR", "mean_rank", "median_rank"),
    paper={("val", "paper"): dict(PAPER_RETRIEVAL)},  # measured with the original protocol only
    run=run_retrieval,
    preprocess={"paper": SQUASH},  # the original script squashes (resize to 224x224, then RGB)
    needs={"*": (IMAGE_RETRIEVAL,)},
    family_paper={"clip": {("val", "paper"): dict(PAPER_RETRIEVAL_CLIP)}},
))

RANKING = register(Task(
    name="visdial_ranking",
    description="VisDial v1.0 val: rank the 100 answer options of every round given the image and the dialogue "
                "so far (paper Table 2)",
    settings=("val",),
    protocols=PROTOCOLS,
    files={"dialogs": DIALOGS_FILE, "dense": DENSE_FILE, "images": IMAGE_DIR},
    metrics=("NDCG", "MRR", "R@1", "R@5", "R@10", "R@20", "mean_rank"),
    paper={("val", "paper"): dict(PAPER_RANKING)},
    run=run_ranking,
    preprocess={"paper": SQUASH},
    needs={"*": (SCORE_CONTINUATIONS,)},
))

TASKS = (RETRIEVAL, RANKING)
