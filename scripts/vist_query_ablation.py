"""Which part of a VIST `5cap4img` query does a model use? R@1/5/10 of the corrected protocol's query and of
queries with parts left out, for a FROMAGe (or GILL) release or a CLIP model, on one data root.

    python scripts/vist_query_ablation.py --model-dir WORK/fromage/release --data-root WORK/data
    python scripts/vist_query_ablation.py --clip WORK/standins/clip --data-root WORK/data

Every variant is ranked as `eval` ranks `vist_retrieval` (crop, the story's four photos pushed out, ties by pool
index), so `full` equals eval's `5cap4img` corrected R@k. `photo 4 only` and `mean of photos` use no text and no
LM: the photos' own retrieval embeddings (FROMAGe's `visual_fc`, CLIP's projection). Issue 16: on the miniworld the
target differs from photo 4 by one change, so `photo 4 only` is strong; CLIP's `full` keeps much of it, FROMAGe's
LM path does not.
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from model.datasets import ImageDir, Story, load_stories
from model.family import LM_PROMPTS, has, retrieval_token_of
from model.images import CROP
from tasks import vist
from tasks.metrics import ranks_from_scores, recall_at_k


def _text_and_photos(model, texts: Sequence[str], photos: Sequence[torch.Tensor]) -> list:
    """A query of `texts` with `photos` before the last text (the family's prompt: [RET] ends an LM's)."""
    last = texts[-1] + retrieval_token_of(model) if has(model, LM_PROMPTS) else texts[-1]
    return [*([" ".join(texts[:-1])] if len(texts) > 1 else []), *photos, last]


VARIANTS: dict[str, Callable] = {
    "full": lambda m, s, ctx: vist.model_prompt(m, "corrected", s.captions, [ctx[p] for p in s.context]),
    "5cap (no photos)": lambda m, s, ctx: vist.model_prompt(m, "corrected", s.captions),
    "captions 1-4, photo 4, caption 5": lambda m, s, ctx: _text_and_photos(m, s.captions, [ctx[s.context[-1]]]),
    "photo 4, caption 5": lambda m, s, ctx: _text_and_photos(m, s.captions[-1:], [ctx[s.context[-1]]]),
}


def ablation(model, data_root: str, limit: int | None = None, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """{variant: {R@1, R@5, R@10}} (percent) over the stories whose photos are all readable."""
    stories, listed = load_stories(f"{data_root}/{vist.TASK.files['annotations']}")
    stories = stories[:limit] if limit is not None else stories
    image_dir = ImageDir(f"{data_root}/{vist.TASK.files['images']}")
    pool, by_preprocess, failed = vist.read_pool(model, stories, listed, image_dir, batch_size=batch_size, workers=0,
                                                 preprocessings=[CROP])
    features = by_preprocess[CROP]
    queries: list[Story] = [s for s in stories if not any(p in failed for p in s.photo_ids)]
    column = {pid: i for i, pid in enumerate(pool)}
    targets = torch.tensor([column[s.target] for s in queries])
    masked = [[column[p] for p in s.context] for s in queries]
    with torch.inference_mode():
        pool_emb = model.project_images(torch.stack([features[p] for p in pool]), "retrieval")[:, 0].float()
        pool_matrix = vist.scaled_pool(pool_emb, model.logit_scale)
        context = vist.context_projections(model, queries, "5cap4img", features)
        own = dict(zip(pool, F.normalize(pool_emb, dim=-1)))
        embeddings = {name: model.retrieval_embeddings([build(model, s, context) for s in queries],
                                                       batch_size=batch_size)
                      for name, build in VARIANTS.items()}
        embeddings["photo 4 only"] = torch.stack([own[s.context[-1]] for s in queries])
        embeddings["mean of photos 1-4"] = F.normalize(torch.stack([torch.stack([own[p] for p in s.context]).mean(0)
                                                                    for s in queries]), dim=-1)
    out = {}
    for name, queries_emb in embeddings.items():
        ranks = ranks_from_scores(vist.pool_scores(queries_emb, pool_matrix, masked), targets)
        out[name] = {f"R@{k}": v for k, v in recall_at_k(ranks, vist.KS).items()}
    return out


def main() -> int:
    from fromage_bench.cli import print_input_error
    from model.errors import FromageInputError
    from model.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-dir")
    which.add_argument("--clip")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    try:
        model = load_model(args.model_dir, clip=args.clip, device="cpu", precision="fp32")
        results = ablation(model, args.data_root, args.limit)
    except FromageInputError as err:  # one line naming the file, exit 2, as every fromage-bench command
        return print_input_error(err, "vist_query_ablation")
    for name, metrics in results.items():
        print(f"{name:34s} " + "  ".join(f"{k} {v:6.2f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
