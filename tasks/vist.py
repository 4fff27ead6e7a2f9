"""VIST contextual image retrieval (FROMAGe paper, Table 1).

Each Visual Storytelling (SIS val) story has five sentences, one per photo. The query is built from the
story's text (and, in one setting, its first four photos) followed by `[RET]`; the target is the fifth
photo, retrieved from a pool of every readable photo used by some story.

Settings:
  * ``1cap``     - the last sentence only:             caption5[RET]
  * ``5cap``     - the five sentences:                 caption1 caption2 ... caption5[RET]
  * ``5cap4img`` - sentences and the first four photos: caption1 image1 caption2 ... image4 caption5[RET]
    (the default, and the setting of the original evaluation script).

Data: stories are grouped by ``story_id`` and their entries sorted by ``worker_arranged_photo_order``
(the original kept file order, which is the same order in the released file). A story needs exactly five
entries. The candidate pool holds every photo used in some story whose image file can be read, in the
order of the file's ``images`` list (photos missing from that list follow, in order of first use):
readable photos of skipped stories stay in it, photos no story uses are not in it. A story with any
missing or corrupt photo is skipped as a query and counted. With ``--limit N`` the queries and the pool
both come from the first N stories of the file. Pooled CLIP features are computed once per photo (and
cached); context photos go through the captioning mapping, pool photos through the retrieval mapping.

Scoring (both protocols): the query is the normalised retrieval embedding at the prompt's last position,
which is its `[RET]` token; pool scores are ``query @ (exp(logit_scale) * normalised pool embeddings)``;
the story's own context photos (its first four) get -10000 in every setting, as the original masks
``story_data[:-1]``; ranking is by score, ties by pool index (as the original's CUDA ``topk(10)`` takes them).

Protocols differ in the per-caption BOS, the dtype of the scoring and the images: ``paper`` squashes the
images as the original script does (resize to 224x224, then RGB), ``corrected`` centre-crops them as the model
was trained (`model.images`), for the pool and the context photos alike.
  * ``paper`` - exactly the original: every caption is tokenised on its own with special tokens, so each
    one starts with its own BOS ``</s>``; ``[RET]`` is appended to the last caption with no space
    (``caption + "[RET]"``) before tokenising. Pool matrix, query normalisation, product and mask are
    computed in the model's dtype (bf16/fp16 at those precisions), as the original does in
    ``logit_scale.dtype``; bf16 makes many candidates tie.
  * ``corrected`` - the interleaving used everywhere else by the model API: the captions are strings and
    only the first text of the prompt keeps its BOS (captions 2-5 have none); ``[RET]`` is appended the
    same way. Scores in float32. For ``1cap`` both protocols build the same prompt (the photos still differ).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from model.clip_baseline import CLIP_READINGS
from model.datasets import ImageDir, Story, load_stories
from model.errors import FromageInputError
from model.family import IMAGE_RETRIEVAL, INTERLEAVED_QUERY, LM_PROMPTS, family_of, has, retrieval_token_of
from model.images import CROP, SQUASH

from .base import RunContext, Skipped, Task, TaskResult, register
from .cache import load_features_per_preprocess
from .chance import rank_chance
from .metrics import mean_rank, mean_reciprocal_rank, ranks_from_scores, recall_at_k

RET_TOKEN = "[RET]"
SETTINGS = ("1cap", "5cap", "5cap4img")
PROTOCOLS = ("paper", "corrected")
MASK_PENALTY = 10000.0
KS = (1, 5, 10)
TOP_K = 10

PAPER_NUMBERS = {
    "1cap": {"R@1": 11.3, "R@5": 24.6, "R@10": 32.1},
    "5cap": {"R@1": 10.8, "R@5": 23.8, "R@10": 31.7},
    "5cap4img": {"R@1": 18.2, "R@5": 42.7, "R@10": 51.8},
}
PAPER_BASELINES = {
    "1cap": {"CLIP ViT-L/14": {"R@1": 11.9, "R@5": 25.5, "R@10": 32.2}},
    "5cap": {"CLIP ViT-L/14": {"R@1": 5.9, "R@5": 19.5, "R@10": 28.0}},
    "5cap4img": {"CLIP ViT-L/14": {"R@1": 2.4, "R@5": 21.3, "R@10": 34.0}},
}


# -- data: `Story` and `load_stories` (the SIS reader training shares) are in model.datasets -------------


def pool_candidates(stories: Sequence[Story], listed: Sequence[str]) -> list[str]:
    """Photos used by some story: in `images` list order, then unlisted ones in order of first use."""
    used: dict[str, None] = {}
    for story in stories:
        for pid in story.photo_ids:
            used.setdefault(pid, None)
    ordered = [pid for pid in dict.fromkeys(listed) if pid in used]
    seen = set(ordered)
    return ordered + [pid for pid in used if pid not in seen]


# -- prompts ----------------------------------------------------------------------------------------------
def setting_parts(setting: str, story: Story) -> tuple[tuple[str, ...], int]:
    """(captions used, number of context photos interleaved) for a setting."""
    if setting == "1cap":
        return story.captions[-1:], 0
    if setting == "5cap":
        return story.captions, 0
    if setting == "5cap4img":
        return story.captions, len(story.context)
    raise ValueError(f"unknown VIST setting {setting!r}; valid: {', '.join(SETTINGS)}")


def _with_ret(captions: Sequence[str], ret_token: str = RET_TOKEN) -> list[str]:
    return [c + ret_token if i == len(captions) - 1 else c for i, c in enumerate(captions)]


def _interleave(texts: Sequence[Any], context: Sequence[torch.Tensor]) -> list:
    if len(context) not in (0, len(texts) - 1):
        raise ValueError(f"{len(context)} context images for {len(texts)} captions")
    items: list = []
    for i, text in enumerate(texts):
        items.append(text)
        if i < len(context):
            items.append(context[i])
    return items


def paper_prompt(tokenizer, captions: Sequence[str], context: Sequence[torch.Tensor] = (),
                 ret_token: str = RET_TOKEN) -> list:
    """The original's query: each caption tokenised on its own with special tokens (each with its own BOS),
    `[RET]` appended to the last caption with no space; interleaved with the context photos' captioning
    embeddings (caption1, image1, ..., caption_n)."""
    texts = []
    for text in _with_ret(captions, ret_token):
        ids = tokenizer(text, add_special_tokens=True).input_ids
        texts.append(torch.tensor(ids, dtype=torch.long))
    ret_id = tokenizer.convert_tokens_to_ids(ret_token)
    if int(texts[-1][-1]) != ret_id:  # the original reads the last position; retrieval_embeddings the last [RET]
        raise RuntimeError(f"the tokenizer put tokens after {ret_token}: the paper protocol's last position is not "
                           f"{ret_token}")
    return _interleave(texts, context)


def corrected_prompt(captions: Sequence[str], context: Sequence[torch.Tensor] = (), ret_token: str = RET_TOKEN) -> list:
    """The model API's interleaving: strings, BOS only on the first text; `[RET]` appended with no space."""
    return _interleave(_with_ret(captions, ret_token), context)


def dual_encoder_prompt(captions: Sequence[str], context: Sequence[torch.Tensor] = ()) -> list:
    """A query for a model without an LM (CLIP): the captions as strings (it joins them) and the context photos'
    embeddings, no retrieval token; the same in both protocols (they differ in the images and the score dtype)."""
    return _interleave(list(captions), context)


def build_prompt(protocol: str, tokenizer, captions: Sequence[str], context: Sequence[torch.Tensor] = (),
                 ret_token: str = RET_TOKEN) -> list:
    if protocol == "paper":
        return paper_prompt(tokenizer, captions, context, ret_token)
    if protocol == "corrected":
        return corrected_prompt(captions, context, ret_token)
    raise ValueError(f"unknown protocol {protocol!r}")


def model_prompt(model, protocol: str, captions: Sequence[str], context: Sequence[torch.Tensor] = ()) -> list:
    """The protocol's query for this model's family: an LM prompt ending in its retrieval token, or (CLIP) the
    dual encoder's strings and images."""
    if not has(model, LM_PROMPTS):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        return dual_encoder_prompt(captions, context)
    return build_prompt(protocol, model.tokenizer, captions, context, retrieval_token_of(model))


# -- scoring ----------------------------------------------------------------------------------------------
def score_dtype(protocol: str, model_dtype: torch.dtype) -> torch.dtype:
    """What a protocol scores in: paper in the model's dtype, as the original builds its pool matrix and
    queries in `logit_scale.dtype` (bf16 on GPU) and multiplies them in it; corrected in float32."""
    return model_dtype if protocol == "paper" else torch.float32


def scaled_pool(pool_embeddings: torch.Tensor, logit_scale: torch.Tensor | float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """exp(logit_scale) * L2-normalised pool retrieval embeddings (P, D), every step computed (and rounded)
    in `dtype`: the normalisation, the exponential of the scale, their product."""
    if dtype == torch.float32:
        scale = torch.as_tensor(logit_scale, dtype=torch.float32).exp()
        return scale.to(pool_embeddings.device) * F.normalize(pool_embeddings.float(), dim=-1)
    pool = pool_embeddings.to(dtype)
    scale = torch.as_tensor(logit_scale).to(device=pool.device, dtype=dtype).exp()
    return scale * (pool / pool.norm(dim=-1, keepdim=True))


def pool_scores(queries: torch.Tensor, pool_matrix: torch.Tensor, context_columns: Sequence[Sequence[int]]
                ) -> torch.Tensor:
    """(B, P) float32 scores: query @ pool matrix in the matrix's dtype (float32 accumulation, one rounding
    to it), the context photos masked in that dtype too (the original subtracts 10000 from its bf16 scores)."""
    scores = (queries.float() @ pool_matrix.float().T).to(pool_matrix.dtype).cpu()
    return mask_context(scores, context_columns).float()


def mask_context(scores: torch.Tensor, context_columns: Sequence[Sequence[int]]) -> torch.Tensor:
    """Subtract 10000 from each row's context-photo columns (once per context entry, as the original)."""
    scores = scores.clone()
    for row, columns in enumerate(context_columns):
        for column in columns:
            scores[row, column] -= MASK_PENALTY
    return scores


def top_k(scores: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Column indices of the k best scores per row, ties by lower column index."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def story_metrics(ranks: torch.Tensor) -> dict[str, float]:
    out = {f"R@{k}": v for k, v in recall_at_k(ranks, KS).items()}
    out["MRR"] = mean_reciprocal_rank(ranks)
    out["mean_rank"] = mean_rank(ranks)
    return out


def query_embeddings(model, stories: Sequence[Story], setting: str, protocol: str,
                     features: dict[str, torch.Tensor], batch_size: int,
                     context_embeddings: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, shared_dim) normalised query embeddings of stories (normalised in the protocol's `score_dtype`);
    `features` are pooled CLIP features by photo id, `context_embeddings` (optional) their captioning
    projections, computed here if absent."""
    if context_embeddings is None:
        context_embeddings = context_projections(model, stories, setting, features)
    prompts = []
    for story in stories:
        captions, n_images = setting_parts(setting, story)
        context = [context_embeddings[pid] for pid in story.context[:n_images]]
        prompts.append(model_prompt(model, protocol, captions, context))
    return model.retrieval_embeddings(prompts, batch_size=batch_size,
                                      normalize_in=score_dtype(protocol, model.dtype))


def context_projections(model, stories: Sequence[Story], setting: str,
                        features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Captioning embeddings (n_visual_tokens, D) of the stories' context photos, one projection call."""
    wanted = list(dict.fromkeys(pid for s in stories for pid in s.context[:setting_parts(setting, s)[1]]))
    if not wanted:
        return {}
    projected = model.project_images(torch.stack([features[pid] for pid in wanted]), "captioning")
    return dict(zip(wanted, projected))


def read_pool(model, stories: Sequence[Story], listed: Sequence[str], image_dir: ImageDir, cache=None,
              batch_size: int = 32, workers: int | None = None, preprocessings: Sequence[str] = (CROP,)
              ) -> tuple[list[str], dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """(pool photo ids in pool order, pooled CLIP features by preprocessing then photo id, failure reason by
    unreadable photo id). Every photo used by a story is read once per preprocessing (through the feature cache);
    the pool is the readable ones."""
    candidates = pool_candidates(stories, listed)
    paths = [image_dir.find(pid) for pid in candidates]
    by_preprocess, failures = load_features_per_preprocess(model, paths, preprocessings, cache, batch_size, workers)
    if candidates and len(failures) == len(candidates):
        raise FromageInputError(image_dir.root, f"none of the {len(candidates)} photos the stories use could be read",
                                "expected {photo_flickr_id}.jpg or .png files here")
    features = {preprocess: {candidates[i]: f for i, f in sorted(by_index.items())}
                for preprocess, by_index in by_preprocess.items()}
    failed = {candidates[i]: reason for i, reason in sorted(failures.items())}
    return [pid for pid in candidates if pid not in failed], features, failed


def unmasked_pool_sizes(queries: Sequence[Story], pool: Sequence[str]) -> list[int]:
    """Per query, the candidates a random scorer could rank the target among: the pool less the story's masked
    context photos (which always rank last). The chance levels come from these."""
    in_pool = set(pool)
    return [len(pool) - len({pid for pid in story.context if pid in in_pool} - {story.target}) for story in queries]


# -- the task ---------------------------------------------------------------------------------------------
def run(ctx: RunContext, setting: str, protocols: tuple[str, ...]) -> list[TaskResult]:
    if setting not in SETTINGS:
        raise FromageInputError(f"vist_retrieval:{setting}", "unknown setting", f"valid: {', '.join(SETTINGS)}")
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise FromageInputError(f"--protocol {protocol}", "unknown protocol for vist_retrieval")
    model = ctx.model
    json_path = TASK.path(ctx, "annotations", setting)
    image_dir = ImageDir(TASK.path(ctx, "images", setting))
    stories, listed = load_stories(json_path)
    if ctx.limit is not None:
        stories = stories[:ctx.limit]

    with torch.inference_mode():
        preprocess = {protocol: TASK.preprocessing(protocol) for protocol in protocols}
        pool, features, failed = read_pool(model, stories, listed, image_dir, ctx.cache, ctx.batch_size,
                                           ctx.image_workers, list(preprocess.values()))
        column = {pid: i for i, pid in enumerate(pool)}

        skipped = Skipped()
        queries: list[Story] = []
        for story in stories:
            reason = next((failed[pid] for pid in story.photo_ids if pid in failed), None)
            if reason is not None:
                skipped.add(reason, story.story_id)
            else:
                queries.append(story)

        ranks = {p: [] for p in protocols}
        predictions: dict[str, list[dict]] = {p: [] for p in protocols}
        if queries:
            logit_scale = model.logit_scale
            pool_matrix = {}
            for protocol in protocols:
                by_id = features[preprocess[protocol]]
                embeddings = model.project_images(torch.stack([by_id[pid] for pid in pool]), "retrieval")[:, 0]
                pool_matrix[protocol] = scaled_pool(embeddings, logit_scale, score_dtype(protocol, logit_scale.dtype))
            size = max(1, ctx.batch_size)

            def embed(chunk: list[Story]) -> list[dict[str, list[float]]]:
                """Per story, per protocol: the normalised query embedding (float32 as Python floats)."""
                context = {p: context_projections(model, chunk, setting, by_id) for p, by_id in features.items()}
                by_protocol = {protocol: query_embeddings(model, chunk, setting, protocol, features[preprocess[protocol]],
                                                          ctx.batch_size, context[preprocess[protocol]]
                                                          ).float().cpu().tolist()
                               for protocol in protocols}
                return [{protocol: by_protocol[protocol][i] for protocol in protocols} for i in range(len(chunk))]

            # the step names each protocol's image preprocessing: a journal of another preprocessing is not reused
            step = "query_embeddings:" + ",".join(f"{p}/{preprocess[p]}" for p in protocols)
            embedded = ctx.map_batches(step, queries,
                                       key=lambda story: story.story_id, compute=embed, batch_size=size,
                                       desc=f"vist {setting}", unit="story")
            for start in range(0, len(queries), size):  # scored in the same chunks as they were embedded
                chunk = queries[start:start + size]
                targets = torch.tensor([column[s.target] for s in chunk])
                context_columns = [[column[pid] for pid in s.context] for s in chunk]
                for protocol in protocols:
                    q = torch.tensor([e[protocol] for e in embedded[start:start + size]], dtype=torch.float32,
                                     device=pool_matrix[protocol].device)
                    scores = pool_scores(q, pool_matrix[protocol], context_columns)
                    chunk_ranks = ranks_from_scores(scores, targets)
                    best = top_k(scores, TOP_K)
                    ranks[protocol].append(chunk_ranks)
                    for story, rank, top in zip(chunk, chunk_ranks.tolist(), best.tolist()):
                        predictions[protocol].append({
                            "story_id": story.story_id, "target": story.target, "rank": rank,
                            "top10": [pool[i] for i in top], "context": list(story.context),
                            "captions": list(story.captions)})

    chance = rank_chance(unmasked_pool_sizes(queries, pool), KS)
    results = []
    for protocol in protocols:
        all_ranks = torch.cat(ranks[protocol]) if ranks[protocol] else torch.zeros(0, dtype=torch.long)
        metrics = story_metrics(all_ranks) if all_ranks.numel() else {}
        results.append(TASK.result(
            setting, protocol, family_of(model), metrics=metrics, n_examples=len(queries), skipped=skipped,
            predictions=predictions[protocol], chance=chance,
            extra={"paper_baselines": PAPER_BASELINES[setting], "pool_size": len(pool),
                   "n_stories": len(stories), "unreadable_photos": len(failed), **family_extra(model, protocol)}))
    return results


def family_extra(model, protocol: str) -> dict[str, Any]:
    """What a CLIP result records of how CLIP saw the queries (our readings); nothing for an LM family."""
    if has(model, LM_PROMPTS):
        return {}
    return {"clip_readings": {**CLIP_READINGS, "protocol": f"{protocol}: the protocol's image preprocessing and "
                              f"score dtype; the query is the same text in both protocols"}}


TASK = register(Task(
    name="vist_retrieval",
    description="VIST contextual image retrieval (paper Table 1): retrieve a story's last photo from its "
                "sentences (and earlier photos) + [RET], among all story photos",
    settings=SETTINGS,
    protocols=PROTOCOLS,
    files={"annotations": "vist/sis/val.story-in-sequence.json", "images": "vist/images/val"},
    metrics=("R@1", "R@5", "R@10", "MRR", "mean_rank"),
    paper={(setting, "paper"): numbers for setting, numbers in PAPER_NUMBERS.items()},
    run=run,
    default_setting="5cap4img",
    preprocess={"paper": SQUASH},  # the original script squashes (resize to 224x224, then RGB)
    needs={"*": (IMAGE_RETRIEVAL,), "5cap4img": (INTERLEAVED_QUERY,)},
    family_paper={"clip": {(setting, "paper"): dict(rows["CLIP ViT-L/14"]) for setting, rows in PAPER_BASELINES.items()},
                  "gill": {("5cap4img", "paper"): {"R@1": 20.3, "R@5": 45.0, "R@10": 53.7}}},  # spec: GILL's row
))
