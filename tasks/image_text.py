"""Image-text retrieval recall over a whole caption set (CC3M validation style, or the Karpathy COCO test
split): text->image and image->text, as the original training code's validation measured it.

Replicated choices of the original validation (`fromage/evaluate.py` + `fromage/data.py` + the model's
retrieval forward):

* query text = caption + ``"[RET]"`` with no space, tokenised WITH the BOS, truncated to the training
  ``max_len`` of 24 tokens with the last token forced to ``[RET]`` when the caption was cut;
* when the model's args carry an ``input_prompt`` (the release: ``"A picture of"``, with
  ``add_input_to_ret: true``), the validation prepended its tokens (no BOS of their own) in front of the
  BOS-led caption: so do we; the 4-visual-token release has no prompt;
* text embedding = ``text_hidden_fcs`` output at the ``[RET]`` position, L2-normalised
  (``model.retrieval_embeddings``); image embedding = ``visual_fc`` of the CLIP pooled features,
  L2-normalised; score = cosine (the original's ``exp(logit_scale)`` factor does not change any ranking).

Protocol (one, "standard"): t2i ranks every caption's own image among all readable images; i2t ranks an
image's captions among all captions and takes the best-ranked of its own (the usual convention for
multi-caption sets; CC3M has one caption per image). Ties: lower index first (`tasks.metrics`).
Images that are missing or corrupt are left out with their captions and counted in `Skipped`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from model.errors import FromageInputError
from model.family import LM_PROMPTS, family_of, has, retrieval_token_of
from model.images import CROP

from .base import RunContext, Skipped, Task, TaskResult, register
from .cache import load_features
from .caption_data import FILES, SETTINGS, CaptionedImage, load_setting
from .chance import best_of_mean_rank_chance, best_of_recall_chance, rank_chance
from .metrics import mean_rank, median_rank, ranks_from_scores, recall_at_k

ORIGINAL_MAX_LEN = 24   # main.py --max-len default: captions (with BOS and [RET]) are cut to this many tokens
TOP_K = 5               # predicted ids kept per query in the predictions
_ROWS_PER_CHUNK = 1024  # score-matrix rows ranked at once


def retrieval_prefix(model_args) -> str | None:
    """The input prompt the original validation put before the caption in retrieval mode, if any."""
    extra = getattr(model_args, "extra", None) or {}
    prompt = extra.get("input_prompt")
    if not prompt or not extra.get("add_input_to_ret", True):
        return None
    return prompt


def retrieval_query_ids(tokenizer, caption: str, ret_token_id: int, prefix: str | None = None,
                        max_len: int | None = ORIGINAL_MAX_LEN, ret_token: str = "[RET]") -> list[int]:
    """Token ids of one text query as the original validation built them:
    ``prefix`` tokens (no BOS) + ``BOS caption [RET]`` truncated to ``max_len`` tokens, the last one set to
    ``[RET]`` when truncation removed it. The embedding is read at the last position (the ``[RET]``)."""
    ids = tokenizer(caption + ret_token, add_special_tokens=True).input_ids
    if max_len is not None and len(ids) > max_len:
        ids = ids[:max_len]
        ids[-1] = ret_token_id
    if ids[-1] != ret_token_id:  # the tokenizer must split "[RET]" off as its own token
        raise ValueError(f"caption {caption!r} does not end in the {ret_token} token after tokenisation")
    prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids if prefix else []
    return list(prefix_ids) + list(ids)


def text_to_image_ranks(text_emb: torch.Tensor, image_emb: torch.Tensor, caption_image: Sequence[int],
                        k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks (n_captions,), top-k image indices (n_captions, k)) of each caption's own image among all
    images, scores = text_emb @ image_emb.T."""
    targets = torch.as_tensor(caption_image, dtype=torch.long)
    ranks, tops = [], []
    for start in range(0, text_emb.shape[0], _ROWS_PER_CHUNK):
        scores = (text_emb[start:start + _ROWS_PER_CHUNK] @ image_emb.T).float().cpu()
        ranks.append(ranks_from_scores(scores, targets[start:start + _ROWS_PER_CHUNK]))
        tops.append(_top_k(scores, k))
    return torch.cat(ranks), torch.cat(tops)


def image_to_text_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: Sequence[int],
                        k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ranks (n_images,), best own caption index (n_images,), top-k caption indices (n_images, k)).

    An image's rank is the best rank among its own captions: the rank of its highest-scoring own caption
    (the lowest index among equal ones), which the tie rule of `ranks_from_scores` ranks ahead of the
    others."""
    owner = torch.as_tensor(caption_image, dtype=torch.long)
    n_images = image_emb.shape[0]
    if torch.bincount(owner, minlength=n_images)[:n_images].min() == 0:
        raise ValueError("every image needs at least one caption")
    ranks, best, tops = [], [], []
    for start in range(0, n_images, _ROWS_PER_CHUNK):
        rows = torch.arange(start, min(start + _ROWS_PER_CHUNK, n_images))
        scores = (image_emb[rows] @ text_emb.T).float().cpu()
        own = owner[None, :] == rows[:, None]
        # argmax returns the first maximal index: the own caption that ranks best under the tie rule
        target = scores.masked_fill(~own, float("-inf")).argmax(dim=1)
        ranks.append(ranks_from_scores(scores, target))
        best.append(target)
        tops.append(_top_k(scores, k))
    return torch.cat(ranks), torch.cat(best), torch.cat(tops)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best columns per row: score descending, lower index first among equal scores."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def summarise(t2i: torch.Tensor, i2t: torch.Tensor) -> dict[str, float]:
    out = {}
    for prefix, ranks in (("t2i", t2i), ("i2t", i2t)):
        out.update({f"{prefix}_R@{k}": v for k, v in recall_at_k(ranks, (1, 5, 10)).items()})
        out[f"{prefix}_mean_rank"] = mean_rank(ranks)
        out[f"{prefix}_median_rank"] = median_rank(ranks)
    return out


def readable_images(ctx: RunContext, items: list[CaptionedImage], skipped: Skipped,
                    source) -> tuple[list[CaptionedImage], torch.Tensor]:
    """The items whose image could be read, and their pooled CLIP features (N, vision_dim), via the
    feature cache; the others are counted in `skipped`. No readable image at all is bad input. Images are
    centre-cropped, as the original's training and CC3M validation prepare them."""
    features, failures = load_features(ctx.model, [item.path for item in items], ctx.cache, ctx.batch_size,
                                       ctx.image_workers, preprocess=CROP)
    for i, reason in sorted(failures.items()):
        skipped.add(reason, items[i].image_id)
    keep = [i for i in range(len(items)) if i in features]
    if not keep:
        raise FromageInputError(source, f"none of its {len(items)} images could be read",
                                "check the image directory of this setting")
    return [items[i] for i in keep], torch.stack([features[i] for i in keep])


@torch.inference_mode()
def run(ctx: RunContext, setting: str, protocols: tuple[str, ...] = ("standard",)) -> list[TaskResult]:
    model = ctx.model
    skipped = Skipped()
    source = TASK.path(ctx, "captions", setting)
    items, features = readable_images(ctx, load_setting(TASK, ctx, setting, skipped), skipped, source)

    image_emb = F.normalize(model.project_images(features, "retrieval")[:, 0].float(), dim=-1)
    captions = [(c, i) for i, item in enumerate(items) for c in item.captions]
    caption_image = [i for _, i in captions]

    queries, prefix, query_extra = text_queries(model, [c for c, _ in captions])
    order = sorted(range(len(queries)), key=lambda q: len(queries[q]))  # similar lengths batch together
    size = max(1, ctx.batch_size)

    def embed(rows: list[int]) -> list[list[float]]:
        prompts = [[queries[q] if isinstance(queries[q], str) else torch.tensor(queries[q], dtype=torch.long)]
                   for q in rows]
        return model.retrieval_embeddings(prompts, batch_size=size).float().cpu().tolist()

    def key(q: int) -> str:
        caption, i = captions[q]
        return f"{q}:{items[i].image_id}:{caption}"

    # batches follow the length order, which depends on the captions alone; float32 round-trips through JSON
    # the timed work is one [RET] embedding per caption: its latency and rate are per caption (the metrics
    # count images for i2t, captions for t2i)
    values = ctx.map_batches("query_embeddings", order, key=key, compute=embed, batch_size=size,
                             desc=f"{TASK.name}:{setting} text", unit="caption")
    text_emb = torch.empty(len(queries), image_emb.shape[1], device=image_emb.device)
    if order:
        text_emb[torch.tensor(order, device=text_emb.device)] = torch.tensor(values, dtype=torch.float32).to(text_emb)

    t2i, t2i_top = text_to_image_ranks(text_emb, image_emb, caption_image)
    i2t, i2t_best, i2t_top = image_to_text_ranks(image_emb, text_emb, caption_image)
    metrics = summarise(t2i, i2t)

    predictions = []
    for q, (caption, i) in enumerate(captions):
        predictions.append({"direction": "t2i", "caption_index": q, "caption": caption, "target": items[i].image_id,
                            "rank": int(t2i[q]), "top": [items[j].image_id for j in t2i_top[q].tolist()]})
    for i, item in enumerate(items):
        predictions.append({"direction": "i2t", "image_id": item.image_id, "image": item.name, "rank": int(i2t[i]),
                            "best_own_caption": int(i2t_best[i]), "top": i2t_top[i].tolist()})
    extra = {"n_images": len(items), "n_captions": len(captions), "query_prefix": prefix, **query_extra}
    return TASK.results(setting, protocols, metrics=metrics, n_examples=len(items), skipped=skipped,
                        predictions=predictions, extra=extra, family=family_of(model),
                        chance=retrieval_chance(items))


def text_queries(model, captions: list[str]) -> tuple[list, str | None, dict]:
    """(one query per caption, the prefix put before it, what the results record of them): token ids as the
    original validation built them for an LM family; the caption itself for CLIP (it truncates to its own
    length, keeping the end: `model.clip_baseline`)."""
    if not has(model, LM_PROMPTS):
        from model.clip_baseline import CLIP_READINGS

        return list(captions), None, {"query_max_len": model.max_text_len, "clip_readings": dict(CLIP_READINGS)}
    prefix = retrieval_prefix(model.model_args)
    token = retrieval_token_of(model)
    queries = [retrieval_query_ids(model.tokenizer, c, model.retrieval_token_id, prefix, ret_token=token)
               for c in captions]
    return queries, prefix, {"query_max_len": ORIGINAL_MAX_LEN}


def retrieval_chance(items: Sequence[CaptionedImage]) -> dict[str, float]:
    """`summarise`'s metrics for random scores: t2i ranks one image among all; i2t takes the best of an image's own
    captions among all captions (no median: its distribution differs per image when the caption counts do)."""
    n_captions = sum(len(item.captions) for item in items)
    chance = rank_chance([len(items)] * n_captions, (1, 5, 10), prefix="t2i_", mrr=False, median=True)
    pools = [(n_captions, len(item.captions)) for item in items]
    chance.update({f"i2t_R@{k}": best_of_recall_chance(pools, k) for k in (1, 5, 10)})
    chance["i2t_mean_rank"] = best_of_mean_rank_chance(pools)
    return chance


TASK = register(Task(
    name="image_text_retrieval",
    description="Text->image and image->text recall over a whole caption set (CC3M val TSV or Karpathy COCO test), "
                "[RET] text embeddings vs visual_fc image embeddings, as the original validation",
    settings=SETTINGS,
    protocols=("standard",),
    files=dict(FILES),
    metrics=("t2i_R@1", "t2i_R@5", "t2i_R@10", "t2i_mean_rank", "t2i_median_rank",
             "i2t_R@1", "i2t_R@5", "i2t_R@10", "i2t_mean_rank", "i2t_median_rank"),
    paper={},  # the paper reports no CC3M/COCO retrieval recall for FROMAGe, nor does the spec quote training logs
    run=run,
    default_setting="cc3m",
))
