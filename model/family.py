"""Model families behind one task interface: what `tasks/` may ask of a model (`TaskModel`), and what each
family can do (`capabilities`).

Families:
  * "fromage": `model.inference.Fromage` (an LM reading interleaved prompts, a `[RET]` token for retrieval);
  * "gill":    FROMAGe-like (`model.gill`, composes/subclasses `Fromage`), retrieval token `[IMG0]`;
  * "clip":    `model.clip_baseline.ClipBaseline`, a dual encoder: cosine retrieval between its text and image
               towers, no LM (it can neither score continuations nor generate).

A task asks `has(model, CAPABILITY)` before a step that needs it; a cell whose family lacks what it needs is
recorded as skipped with `missing_capability(...)` as its reason.

Prompts (`Prompt`, `model.prompts`) are lists of strings, token-id tensors and image embeddings (tensors from
`project_images(features, "captioning")`). An LM family reads them as interleaved LM input; a model without
`LM_PROMPTS` (CLIP) reads the strings and image embeddings only, so tasks give it strings, never token ids.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import torch

from .files import file_stamp

# -- capabilities ---------------------------------------------------------------------------------------
IMAGE_RETRIEVAL = "image_retrieval"          # text query -> embedding in the space of the images' embeddings
INTERLEAVED_QUERY = "interleaved_query"      # a query with images among its texts (VIST 5cap4img)
SCORE_CONTINUATIONS = "score_continuations"  # log-likelihood of continuations given a context (VisDial ranking)
GENERATE = "generate"                        # decode text from an image prompt (captioning)
LM_PROMPTS = "lm_prompts"                    # reads prompts of its tokenizer's token ids (the paper protocols'
                                             # per-caption tokenisation), and has model args (input prompts)
CAPABILITIES = (IMAGE_RETRIEVAL, INTERLEAVED_QUERY, SCORE_CONTINUATIONS, GENERATE, LM_PROMPTS)

FAMILIES = ("fromage", "gill", "clip")
# What each family supports (`fromage-bench tasks` prints it; each implementation's `capabilities` is this).
FAMILY_CAPABILITIES: dict[str, frozenset[str]] = {
    "fromage": frozenset(CAPABILITIES),
    "gill": frozenset(CAPABILITIES) - {GENERATE},  # model.gill leaves text generation out
    "clip": frozenset({IMAGE_RETRIEVAL, INTERLEAVED_QUERY}),
}


@runtime_checkable
class TaskModel(Protocol):
    """What tasks ask a model. Every family has the members below. The LM members exist only where
    `capabilities` says so (see `model.inference.Fromage` for their signatures):
      LM_PROMPTS:          `model_args` (model.args.ModelArgs: input prompts...), `retrieval_token_id` (int);
      SCORE_CONTINUATIONS: `encode_context(context, previous=None)`, `score_continuations(context, texts, ...)`;
      GENERATE:            `generate(prompts, max_new_tokens, **decoding)`, `decode(output)`."""

    family: str                        # one of FAMILIES
    capabilities: frozenset[str]       # names from CAPABILITIES
    fingerprint: str                   # its outputs at this precision (keys the feature cache and journals)
    placement: Any                     # model.precision.Placement: device, dtype, precision
    counters: Counter                  # work done (images, tokens, ...): the harness derives throughput
    retrieval_token: str | None        # appended to a retrieval query: "[RET]" (FROMAGe), "[IMG0]" (GILL), None (CLIP)

    @property
    def tokenizer(self) -> Any: ...    # the text tokenizer (a Hugging Face tokenizer)

    @property
    def logit_scale(self) -> torch.Tensor: ...  # log of the retrieval scale, in `dtype` (exp() scales scores)

    @property
    def dtype(self) -> torch.dtype: ...  # the dtype the model computes in

    @property
    def weight_bytes(self) -> int: ...

    def image_file_features(self, paths: Sequence[str | Path], batch_size: int = 32, workers: int | None = None,
                            preprocess: str = ...) -> Iterator[tuple[list[int], torch.Tensor, dict[int, str]]]:
        """Pooled image features of files, batch by batch: (positions, (n, feature_dim), reason by unreadable
        position). Cached per fingerprint and preprocessing by `tasks.cache`."""
        ...

    def project_images(self, features: torch.Tensor, mode: str = "captioning") -> torch.Tensor:
        """(N, tokens, dim): "retrieval" -> the retrieval space ([:, 0] is the embedding, not normalised);
        "captioning" -> what a prompt holds for the image."""
        ...

    def retrieval_embeddings(self, prompts_batch: Sequence[Any], batch_size: int = 16,
                             normalize_in: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, dim) normalised query embeddings, float32."""
        ...


# A model without the protocol's family members (a test double written for FROMAGe) counts as FROMAGe.
def has(model: Any, capability: str) -> bool:
    return capability in getattr(model, "capabilities", FAMILY_CAPABILITIES["fromage"])


def family_of(model: Any) -> str:
    return getattr(model, "family", "fromage")


def retrieval_token_of(model: Any) -> str | None:
    return getattr(model, "retrieval_token", "[RET]")


def missing_capability(model: Any, capability: str, needed_for: str) -> str | None:
    """The reason a cell is skipped, or None if the model can do it."""
    if has(model, capability):
        return None
    family = family_of(model)
    return f"the {family} family cannot {_VERBS.get(capability, capability)}, which {needed_for} needs"


_VERBS = {IMAGE_RETRIEVAL: "embed retrieval queries", INTERLEAVED_QUERY: "read queries with images",
          SCORE_CONTINUATIONS: "score continuations", GENERATE: "generate text", LM_PROMPTS: "read LM prompts"}


def source_state(source: str | Path | None) -> str | None:
    """A digest of every file under a model directory (relative path, size, mtime): a model retrained or replaced
    in place gets another one. None for anything that is not a directory (a hub id, random init)."""
    if source is None or not Path(source).is_dir():
        return None
    digest = hashlib.sha256()
    root = Path(source)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root)}\0{file_stamp(path)}\n".encode())
    return digest.hexdigest()


def model_record(family: str, label: str, source: str | Path | None) -> dict[str, str | None]:
    """The results' top-level "model" entry (see SPLIT contract 2), with the directory's `source_state`."""
    return {"family": family, "label": label, "source": None if source is None else str(source),
            "source_state": source_state(source)}
