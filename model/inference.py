"""`Fromage`: the user-facing model. The original Python API (drop-in) plus batched methods for the harness."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import FromageInputError
from .family import FAMILY_CAPABILITIES
from .fromage import FromageModel
from .generation import GenerationOutput, generate
from .images import CROP, SQUASH, open_image, pixel_batches, pixel_values, prepare
from .precision import Placement, weight_bytes
from .prompts import Prompt, embed_prompt, pad_batch
from .retrieval_set import RetrievalSet
from .scoring import (ContinuationScores, EncodedContext, encode_context, log_likelihood, score_continuations,
                      score_continuations_naive)

log = logging.getLogger(__name__)

RETRIEVED_PATH = "retrieved_from"  # key in a retrieved image's `info`: the retrieval-set file it was opened from


def truncate_caption(caption: str) -> str:
    """Keep text up to and including the first newline, or failing that the first full stop."""
    caption = caption.strip("\n")
    for stop in ("\n", "."):
        cut = caption.find(stop)
        if cut >= 0:
            return caption[:cut + 1]
    return caption


@dataclass
class RetQuery:
    """One `[RET]` token of a prompt or a generation: where its text ends and its embedding."""
    text_end: int            # index into the token ids the caption before it is decoded from
    embedding: torch.Tensor  # (shared_dim,) normalised


class Fromage(nn.Module):
    """Wraps a FromageModel (`.model`, as in the original) with an optional retrieval set. Implements
    `model.family.TaskModel` (the members tasks use), family "fromage"."""

    family = "fromage"
    capabilities = FAMILY_CAPABILITIES["fromage"]
    retrieval_token = "[RET]"

    def __init__(self, model: FromageModel, placement: Placement, retrieval_set: RetrievalSet | None = None,
                 fingerprint: str = "", model_identity: str = ""):
        super().__init__()
        self.model = model
        self.placement = placement
        self.fingerprint = fingerprint        # the model's outputs at this precision (keys caches and journals)
        self.model_identity = model_identity  # its retrieval-space image embeddings, any precision (`loading.model_identity`)
        self.retrieval_set = None
        self.path_array: list[str] | None = None
        self.emb_matrix: torch.Tensor | None = None
        self.counters: Counter = Counter()  # work done (images, tokens, ...): the harness derives throughput
        if retrieval_set is not None:
            self.set_retrieval_set(retrieval_set)

    def set_retrieval_set(self, retrieval_set: RetrievalSet, accept_foreign: bool = False) -> None:
        """As the original: rows normalised and multiplied by exp(logit_scale). A set recorded as built by another
        model or with another preprocessing than the API's crop is bad input unless `accept_foreign`."""
        if retrieval_set.embeddings.shape[1] != self.model.args.shared_emb_dim:
            raise FromageInputError(retrieval_set.source or "retrieval set",
                                    f"embeddings have dimension {retrieval_set.embeddings.shape[1]}, "
                                    f"the model's retrieval space has {self.model.args.shared_emb_dim}")
        if self.model_identity:
            retrieval_set.check_provenance(self.model_identity, CROP, accept_foreign)
        self.retrieval_set = retrieval_set
        self.path_array = retrieval_set.paths
        matrix = retrieval_set.embeddings.to(device=self.model.device, dtype=self.model.dtype)
        with torch.no_grad():
            self.emb_matrix = self.model.logit_scale.exp() * F.normalize(matrix, dim=1)

    # -- what tasks read (`model.family.TaskModel`) instead of reaching into `.model` ------------------------
    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def model_args(self):
        """The release's `ModelArgs` (input prompts, dimensions)."""
        return self.model.args

    @property
    def retrieval_token_id(self) -> int:
        return self.model.retrieval_token_idx

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as actually stored (int8 layers count one byte per weight)."""
        return weight_bytes(self.model)

    # -- the original API -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_for_images_and_texts(self, prompts: Prompt, num_words: int = 0, ret_scale_factor: float = 1.0,
                                      top_p: float = 1.0, temperature: float = 0.0, max_num_rets: int = 1,
                                      max_img_per_ret: int = 1, *, min_word_tokens: int = 0,
                                      generator: torch.Generator | None = None) -> list:
        """Interleaved images and strings in; a list of strings and lists of retrieved PIL images out (each
        retrieved image's `info[RETRIEVED_PATH]` names the retrieval-set file it came from).

        Differences from the original, both bug fixes: with num_words=0 the `[RET]` embedding is read at
        the `[RET]` token's position in the full sequence (the original looked the index up among text
        tokens only, so with images before the text it read the wrong position); a newline generated as
        the very first token ends the caption (the original kept decoding text after it).
        """
        if num_words < 0:
            raise ValueError("num_words must be >= 0")
        embedded = embed_prompt(self.model, prompts)
        if num_words == 0:
            hidden = self.model.text_hidden_states(embedded.embeds[None])
            per_position = F.normalize(self.model.retrieval_space(hidden)[0].float(), dim=-1)
            token_ids = embedded.text_ids
            ret_positions = (embedded.labels == self.model.retrieval_token_idx).nonzero().flatten().tolist()
            text_positions = (token_ids == self.model.retrieval_token_idx).nonzero().flatten().tolist()
            queries = [RetQuery(t, per_position[p]) for t, p in zip(text_positions, ret_positions)]
        else:
            gen = generate(self.model, pad_batch([embedded], side="left"), num_words, temperature=temperature,
                           top_p=top_p, min_word_tokens=min_word_tokens, ret_scale_factor=ret_scale_factor,
                           stop_at_newline=True, generator=generator)
            length = int(gen.lengths[0])
            token_ids = gen.token_ids[0, :length]
            ret_positions = (token_ids == self.model.retrieval_token_idx).nonzero().flatten().tolist()
            queries = [RetQuery(p, gen.ret_embeddings[0, p]) for p in ret_positions]
        return self._interleave_outputs(token_ids, queries[:max_num_rets], max_img_per_ret)

    def _interleave_outputs(self, token_ids: torch.Tensor, queries: list[RetQuery], max_img_per_ret: int) -> list:
        decode = self.model.tokenizer.decode
        if not queries:
            return [truncate_caption(decode(token_ids.tolist(), skip_special_tokens=True))]
        if self.emb_matrix is None:
            raise RuntimeError("the prompt produced [RET] but no retrieval set is loaded: "
                               "pass retrieval_set=DIR to load_fromage (see fromage-bench convert-embeddings)")
        outputs: list = []
        seen: list[int] = []
        start = 0
        for query in queries:
            scores = (self.emb_matrix @ query.embedding.to(self.emb_matrix.dtype)).float()
            if seen:
                scores[seen] -= 1000  # do not show the same image twice
            candidates = scores.topk(min(max_img_per_ret + 3, scores.numel())).indices.tolist()
            images = []
            for index in candidates:  # a few spares, in case some cannot be opened
                seen.append(index)
                image = self._open_retrieved(index)
                if image is not None:
                    images.append(image)
                if len(images) == max_img_per_ret:
                    break
            caption = decode(token_ids[start:query.text_end].tolist(), skip_special_tokens=True)
            outputs += [truncate_caption(caption) + " [RET]", images]
            start = query.text_end + 1
        return outputs

    def _open_retrieved(self, index: int) -> Image.Image | None:
        path = self.retrieval_set.resolve(index)
        if "://" in path:
            log.warning("retrieval set entry %d is a URL (%s): nothing is downloaded, skipping it", index, path)
            return None
        try:
            image = prepare(open_image(path), SQUASH)  # as the original shows them: squashed to 224x224, RGB
        except FromageInputError as err:
            log.warning("skipping retrieved image: %s", err)
            return None
        image.info[RETRIEVED_PATH] = path  # which file it is (the original returned the pixels only)
        return image

    def get_log_lik_scores(self, prompts: Prompt) -> float:
        """Minus the mean LM loss over the text tokens of an interleaved prompt (images are not scored)."""
        return log_likelihood(self.model, prompts)

    # -- the batched API for the harness --------------------------------------------------------------
    @torch.inference_mode()
    def image_features(self, images: Sequence[Image.Image], batch_size: int = 32, preprocess: str = CROP
                       ) -> torch.Tensor:
        """(N, vision_dim) pooled CLIP features; `project_images` maps them in either mode. `preprocess` is the
        original code path to reproduce (`model.images`): "crop" (the API, training; the default) or "squash"
        (the original VIST / VisDial scripts)."""
        processor = self.model.feature_extractor
        chunks = [self.model.vision_features(pixel_values(processor, images[i:i + batch_size], preprocess))
                  for i in range(0, len(images), batch_size)]
        self.counters["images_encoded"] += len(images)
        return torch.cat(chunks)

    @torch.inference_mode()
    def image_file_features(self, paths: Sequence[str | Path], batch_size: int = 32, workers: int | None = None,
                            preprocess: str = CROP) -> Iterator[tuple[list[int], torch.Tensor, dict[int, str]]]:
        """Pooled CLIP features of image files, batch by batch, in order: (positions in `paths`, their (n,
        vision_dim) features, reason by unreadable position). Files are decoded and prepared (`preprocess`, as in
        `image_features`) by a DataLoader's `workers` processes (default: `model.images.default_workers`) into
        pinned memory; a file that cannot be decoded is reported, never raised."""
        on_cuda = self.model.device.type == "cuda"
        for positions, pixels, failed in pixel_batches(paths, self.model.feature_extractor, batch_size, workers,
                                                       pin_memory=on_cuda, preprocess=preprocess):
            features = torch.empty(0)  # a batch of unreadable files only
            if pixels is not None:
                features = self.model.vision_features(pixels.to(self.model.device, non_blocking=on_cuda))
                self.counters["images_encoded"] += len(positions)
            yield positions, features, failed

    @torch.inference_mode()
    def project_images(self, features: torch.Tensor, mode: str = "captioning") -> torch.Tensor:
        return self.model.project_visual(features.to(self.model.device), mode)

    def encode_images(self, images: Sequence[Image.Image], mode: str = "captioning", batch_size: int = 32,
                      preprocess: str = CROP) -> torch.Tensor:
        """captioning: (N, n_visual_tokens, lm_dim) LM inputs; retrieval: (N, shared_dim), not normalised.
        `preprocess` as in `image_features` ("crop", as the API, by default)."""
        projected = self.project_images(self.image_features(images, batch_size, preprocess), mode)
        return projected[:, 0] if mode == "retrieval" else projected

    @torch.inference_mode()
    def retrieval_embeddings(self, prompts_batch: Sequence[Prompt], batch_size: int = 16,
                             normalize_in: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, shared_dim) normalised embeddings at the last `[RET]` token of each interleaved prompt, float32.

        Prompts are sorted by length and run in right-padded batches: causal attention never sees the
        padding after a prompt, so each embedding equals the one of that prompt run alone. `normalize_in`: the
        dtype of the normalisation; the model's dtype divides by the norm as the original VIST script does
        (`x / x.norm()` in bf16 on GPU), rounding both.
        """
        embedded = [embed_prompt(self.model, p) for p in prompts_batch]
        self.counters["retrieval_queries"] += len(embedded)
        self.counters["tokens_encoded"] += sum(len(e) for e in embedded)
        ret_at = []
        for i, e in enumerate(embedded):
            hits = (e.labels == self.model.retrieval_token_idx).nonzero()
            if hits.numel() == 0:
                raise ValueError(f"prompt {i} has no [RET] token")
            ret_at.append(int(hits[-1]))
        order = sorted(range(len(embedded)), key=lambda i: len(embedded[i]))
        result = torch.empty(len(embedded), self.model.args.shared_emb_dim, device=self.model.device)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = pad_batch([embedded[i] for i in rows], side="right")
            hidden = self.model.text_hidden_states(batch.embeds, batch.attention_mask, batch.position_ids)
            mapped = self.model.retrieval_space(hidden)
            picks = torch.tensor([ret_at[i] for i in rows], device=mapped.device)
            chosen = mapped[torch.arange(len(rows), device=mapped.device), picks]
            if normalize_in == torch.float32:
                normalized = F.normalize(chosen.float(), dim=-1)
            else:
                chosen = chosen.to(normalize_in)
                normalized = chosen / chosen.norm(dim=-1, keepdim=True)
            result[torch.tensor(rows, device=result.device)] = normalized.float()
        return result

    def encode_context(self, context: Prompt, previous: EncodedContext | None = None) -> EncodedContext:
        """`context` through the LM once, for `score_continuations`; the prefix it shares with `previous` (the
        dialogue's earlier round, say) is taken from that one's KV cache instead of being recomputed."""
        encoded = encode_context(self.model, context, previous)
        self.counters["context_tokens_encoded"] += len(encoded) - encoded.reused
        self.counters["context_tokens_reused"] += encoded.reused
        return encoded

    def score_continuations(self, context: Prompt | EncodedContext, continuations: Sequence[str], *,
                            continuation_bos: bool = False, shift: bool = True, batch_size: int | None = None,
                            naive: bool = False, original_rounding: bool = False) -> ContinuationScores:
        """Log-likelihood of each continuation given one shared interleaved context (KV cache reused).
        `naive=True` re-encodes the context per continuation (the reference path, for checks and benchmarks)."""
        if naive and isinstance(context, EncodedContext):
            raise TypeError("naive scoring re-encodes the context per continuation: pass the Prompt, not an "
                            "EncodedContext")
        if not naive and not isinstance(context, EncodedContext):
            context = self.encode_context(context)
        if naive:
            scores = score_continuations_naive(self.model, context, continuations, continuation_bos=continuation_bos,
                                               shift=shift, original_rounding=original_rounding)
            per_pass = 20
        else:
            scores = score_continuations(self.model, context, continuations, continuation_bos=continuation_bos,
                                         shift=shift, batch_size=batch_size, original_rounding=original_rounding)
            per_pass = batch_size or len(continuations)
        self.counters["scoring_calls"] += 1
        self.counters["scoring_passes"] += -(-len(continuations) // max(1, per_pass))  # forward passes (ceil)
        self.counters["continuations_scored"] += len(continuations)
        self.counters["tokens_scored"] += int(scores.num_tokens.sum())
        self.counters["tokens_run"] += scores.tokens_run
        return scores

    @torch.inference_mode()
    def generate(self, prompts_batch: Sequence[Prompt], max_new_tokens: int = 32, *, use_cache: bool = True,
                 **decoding) -> GenerationOutput:
        """Batched decoding (left-padded prompts); `decoding` takes generation.generate's keyword arguments."""
        batch = pad_batch([embed_prompt(self.model, p) for p in prompts_batch], side="left")
        output = generate(self.model, batch, max_new_tokens, use_cache=use_cache, **decoding)
        self.counters["tokens_generated_computed"] += output.tokens_computed  # decode steps x rows
        self.counters["tokens_generated_kept"] += output.tokens_kept          # up to each row's stop
        return output

    def decode(self, output: GenerationOutput) -> list[str]:
        return [self.model.tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)
                for ids, n in zip(output.token_ids, output.lengths.tolist())]

    @torch.inference_mode()
    def retrieve(self, query_embeddings: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, list[list[str]]]:
        """Top-k retrieval-set scores and paths for (B, shared_dim) queries."""
        if self.emb_matrix is None:
            raise RuntimeError("no retrieval set is loaded")
        scores = query_embeddings.to(self.emb_matrix) @ self.emb_matrix.T
        top = scores.float().topk(min(k, scores.shape[1]), dim=1)
        return top.values.cpu(), [[self.retrieval_set.paths[i] for i in row] for row in top.indices.tolist()]
