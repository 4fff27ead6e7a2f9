"""Interleaved story queries for training: an addition to the original recipe, used only with `--stories`.

The paper trains on single (image, caption) pairs and relies on OPT-6.7B to carry `[RET]` over interleaved
contexts at test time (VIST `5cap4img`: caption1 image1 ... image4 caption5[RET]). A small LM does not
generalise like that: trained on pairs only, the miniworld's FROMAGe ranks VIST's fifth photo at chance
once the context photos are in the prompt (docs/miniworld.md). This source gives training queries of that
shape: a story's sentences 1..k interleaved with its photos 1..k-1 (captioning mapping), `[RET]` after
sentence k, and photo k (retrieval mapping) as the target, under the same contrastive loss as the pairs.
k is drawn from 2..5 per query; half of the queries give every sentence its own BOS (the prompts of VIST's
`paper` protocol), the others only the first (the model API's interleaving).

Data: a VIST story-in-sequence file (its train split, say) and its photo directory, read by the VIST task's
reader (`model.datasets.load_stories`). Stories with a photo file missing are left out. Which stories a
micro-batch reads, each query's k and BOS style are a pure function of (seed, micro-batch index), and rank r
takes the r-th block of the global batch: a resumed or multi-process run reads the same queries as one
uninterrupted process. A story's five photos go through the frozen vision tower together, once, and their
features are kept.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import ImageDir, load_stories
from .errors import FromageInputError
from .fromage import FromageModel
from .images import load_image
from .prompts import tokenize

log = logging.getLogger(__name__)

STORY_STREAM = 0x5707  # separates this source's random stream from the pairs' order and the concat coin
MIN_SENTENCES = 2      # at least one context photo before [RET]


@dataclass
class StoryQueries:
    features: torch.Tensor         # (N, 5, vision_dim) pooled CLIP features of each query's story photos
    sentences: list[list[torch.Tensor]]  # per query, token ids of sentences 1..k ([RET] ends sentence k)

    @property
    def targets(self) -> list[int]:  # index of each query's target photo: the photo of its last sentence
        return [len(s) - 1 for s in self.sentences]


class StorySource:
    def __init__(self, json_path: str | Path, image_dir: str | Path, model: FromageModel, batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0):
        self.model, self.batch_size, self.rank, self.seed = model, batch_size, rank, seed
        self.global_batch = batch_size * world_size
        images = ImageDir(Path(image_dir))
        stories, _ = load_stories(Path(json_path))
        self.paths, self.texts = [], []
        left_out = 0
        for story in stories:
            paths = [images.find(pid) for pid in story.photo_ids]
            if any(p is None for p in paths):
                left_out += 1
                continue
            self.paths.append(paths)
            self.texts.append(story.captions)
        if left_out:
            log.warning("%s: %d stories left out (a photo file is missing in %s)", json_path, left_out, image_dir)
        if len(self.paths) < self.global_batch:
            raise FromageInputError(json_path, f"has {len(self.paths)} usable stories, fewer than one global story "
                                    f"batch ({self.global_batch})", "lower --story-batch")
        self._features: dict[int, torch.Tensor] = {}
        self._token_ids: dict[tuple[int, int, bool], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def draws(self, micro_batch: int) -> list[tuple[int, int, bool]]:
        """This rank's (story index, sentences k, BOS on every sentence) for a micro-batch."""
        rng = np.random.default_rng([self.seed, STORY_STREAM, micro_batch])
        chosen = rng.choice(len(self.paths), size=self.global_batch, replace=False)
        ks = rng.integers(MIN_SENTENCES, 6, size=self.global_batch)
        each_bos = rng.random(self.global_batch) < 0.5
        block = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [(int(s), int(k), bool(b)) for s, k, b in zip(chosen[block], ks[block], each_bos[block])]

    def features(self, story: int) -> torch.Tensor:
        """(5, vision_dim) pooled features of a story's photos (the CLIP processor as in the pairs' data)."""
        if story not in self._features:
            photos = [load_image(p) for p in self.paths[story]]  # a corrupt file: one error naming it
            pixels = self.model.feature_extractor(photos, return_tensors="pt").pixel_values
            with torch.no_grad():
                self._features[story] = self.model.vision_features(pixels.to(self.model.device)).float()
        return self._features[story]

    def sentence_ids(self, story: int, sentence: int, keep_bos: bool) -> torch.Tensor:
        key = (story, sentence, keep_bos)
        if key not in self._token_ids:  # every story is drawn many times: tokenise each sentence once
            self._token_ids[key] = tokenize(self.model, self.texts[story][sentence], keep_bos=keep_bos)
        return self._token_ids[key]

    def queries(self, micro_batch: int) -> StoryQueries:
        ret_id = self.model.retrieval_token_idx
        features, sentences = [], []
        for story, k, each_bos in self.draws(micro_batch):
            features.append(self.features(story))
            ids = [self.sentence_ids(story, i, keep_bos=each_bos or i == 0) for i in range(k)]
            ids[-1] = torch.cat([ids[-1], ids[-1].new_tensor([ret_id])])
            sentences.append(ids)
        return StoryQueries(torch.stack(features), sentences)


def story_sequences(model: FromageModel, embed_text, queries: StoryQueries) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T, D) right-padded LM inputs (sentence, photo, sentence, ..., sentence [RET]) and (N,) positions of
    each query's [RET]. `embed_text(ids)` embeds token ids (with the trained [RET] row). Zero padding after
    [RET] is never seen by it (causal attention), as the padding of the pairs' captions."""
    n, photos = queries.features.shape[:2]
    visual = model.project_visual(queries.features.flatten(0, 1), "captioning").unflatten(0, (n, photos))
    rows = []
    for i, ids in enumerate(queries.sentences):
        parts = []
        for j, sentence in enumerate(ids):
            parts.append(embed_text(sentence.to(model.device)))
            if j < len(ids) - 1:
                parts.append(visual[i, j].to(parts[-1].dtype))
        rows.append(torch.cat(parts))
    lengths = torch.tensor([len(r) for r in rows], device=model.device)
    embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return embeds, lengths - 1
