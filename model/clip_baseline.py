"""The CLIP family: `transformers.CLIPModel` (text and vision towers, their projections) as the paper's CLIP
baseline rows (Tables 1 and 2), behind the tasks' `model.family.TaskModel` interface, with cosine retrieval.

How CLIP sees a query is stated only briefly in the paper; these are OUR READINGS (recorded in each CLIP result's
`extra["clip_readings"]` and in the README):
  * text: every string of the query joined by single spaces (VIST's captions, a VisDial dialogue's rounds), no
    retrieval token; tokenised without special tokens, truncated to the text tower's length (77 for CLIP)
    keeping the END (the last tokens: the caption nearest the target), then CLIP's BOS and EOS put around it;
  * images in a query (VIST 5cap4img): the mean of the L2-normalised text embedding and the L2-normalised
    embeddings of the context images (five unit vectors, equal weights), normalised again;
  * image embeddings: `visual_projection` of the vision tower's pooled output; scores are cosine similarities
    (a task's positive scale, exp(logit_scale), changes no ranking).
Images are prepared by each task protocol's preprocessing (`model.images`: crop or squash), so CLIP sees the
pixels FROMAGe sees. Nothing is downloaded: a local directory or a hub id already in the local HF cache.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import FromageInputError
from .family import FAMILY_CAPABILITIES
from .images import CROP, pixel_batches
from .precision import Placement, weight_bytes

TEXT_JOIN = " "
CLIP_READINGS = {
    "query_text": "the query's strings joined by spaces, no retrieval token",
    "truncation": "text tower length (77 for CLIP) keeping the end: BOS + the last tokens + EOS",
    "interleaved_images": "mean of the normalised text embedding and the normalised context-image embeddings, "
                          "renormalised",
    "scores": "cosine similarity of normalised projections",
}


def clip_text_ids(tokenizer, text: str, max_len: int) -> list[int]:
    """BOS + the text's last `max_len - 2` tokens + EOS: truncated keeping the end (our reading)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    keep = max_len - 2
    body = ids[len(ids) - keep:] if len(ids) > keep else ids
    return [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]


def stand_in_clip_tokenizer(tokenizer):
    """A copy of the stand-in OPT's BPE tokenizer with CLIP's text markers as its two highest ids: BOS
    `<|startoftext|>` and EOS `<|endoftext|>` (also the padding, as in CLIP), so that the text tower pools at
    the first EOS (a CLIP config with eos_token_id 2 would pool at the highest id instead)."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                  "pad_token": "<|endoftext|>"})
    return tokenizer


def is_clip_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


class ClipBaseline:
    """A CLIPModel as a `TaskModel` of family "clip": retrieval only (no LM)."""

    family = "clip"
    capabilities = FAMILY_CAPABILITIES["clip"]
    retrieval_token = None

    def __init__(self, clip, tokenizer, processor, placement: Placement, fingerprint: str = "", source: str = ""):
        self.clip = clip
        self.tokenizer = tokenizer
        self.processor = processor
        self.placement = placement
        self.fingerprint = fingerprint
        self.source = source
        self.counters: Counter = Counter()
        self.max_text_len = int(clip.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach()

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.clip)

    @torch.inference_mode()
    def image_file_features(self, paths: Sequence[str | Path], batch_size: int = 32, workers: int | None = None,
                            preprocess: str = CROP) -> Iterator[tuple[list[int], torch.Tensor, dict[int, str]]]:
        """Pooled vision-tower outputs of image files (before `visual_projection`), as `Fromage.image_file_features`."""
        for positions, pixels, failed in pixel_batches(paths, self.processor, batch_size, workers,
                                                       pin_memory=self.device.type == "cuda", preprocess=preprocess):
            features = torch.empty(0)
            if pixels is not None:
                pixels = pixels.to(self.device, self.dtype)
                features = self.clip.vision_model(pixel_values=pixels).pooler_output
                self.counters["images_encoded"] += len(positions)
            yield positions, features, failed

    @torch.inference_mode()
    def project_images(self, features: torch.Tensor, mode: str = "captioning") -> torch.Tensor:
        """(N, 1, projection_dim) image embeddings, not normalised, whatever the mode: a context image in a
        query and a pool image are the same embedding for CLIP."""
        return self.clip.visual_projection(features.to(self.device, self.dtype))[:, None]

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """(B, projection_dim) normalised float32 text embeddings (`clip_text_ids` truncation)."""
        ids = [clip_text_ids(self.tokenizer, t, self.max_text_len) for t in texts]
        self.counters["tokens_encoded"] += sum(len(i) for i in ids)
        out = torch.empty(len(ids), self.clip.config.projection_dim, device=self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            width = max(len(i) for i in chunk)
            input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in chunk], device=self.device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in chunk], device=self.device)
            pooled = self.clip.text_model(input_ids=input_ids, attention_mask=mask).pooler_output
            out[start:start + len(chunk)] = F.normalize(self.clip.text_projection(pooled).float(), dim=-1)
        return out

    @torch.inference_mode()
    def retrieval_embeddings(self, prompts_batch: Sequence[Sequence[Any]], batch_size: int = 16,
                             normalize_in: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, projection_dim) normalised float32 query embeddings of prompts of strings and image embeddings
        (`project_images` rows): see the module's readings. `normalize_in`: the dtype of the last normalisation."""
        texts, images = [], []
        for i, prompt in enumerate(prompts_batch):
            items = [prompt] if isinstance(prompt, str) else list(prompt)
            strings = [x for x in items if isinstance(x, str)]
            tensors = [x for x in items if not isinstance(x, str)]
            if any(not torch.is_floating_point(x) for x in tensors):
                raise TypeError(f"prompt {i}: the clip family reads strings and image embeddings, not token ids")
            texts.append(TEXT_JOIN.join(strings))
            images.append([F.normalize(x.reshape(-1).float(), dim=-1) for x in tensors])
        self.counters["retrieval_queries"] += len(texts)
        text = self.text_embeddings(texts, batch_size)
        combined = torch.stack([torch.stack([t, *[v.to(t.device) for v in vs]]).mean(0) if vs else t
                                for t, vs in zip(text, images)])
        if normalize_in == torch.float32:
            return F.normalize(combined, dim=-1)
        combined = combined.to(normalize_in)
        return (combined / combined.norm(dim=-1, keepdim=True)).float()


def resolve_clip_source(source: str | Path) -> Path:
    """A local CLIP directory for a directory or a hub id in the local HF cache (nothing is downloaded)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not is_clip_dir(path):
            raise FromageInputError(path, "not a CLIP model directory: expected a config.json with model_type \"clip\"")
        return path
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(source), local_files_only=True))
    except Exception:
        raise FromageInputError(source, "CLIP model not found as a directory nor in the local Hugging Face cache",
                                "download it where there is network access (huggingface-cli download) or pass a "
                                "local directory; nothing is fetched at run time") from None
    if not is_clip_dir(path):
        raise FromageInputError(path, "not a CLIP model: its config.json has no model_type \"clip\"")
    return path


def _fingerprint(path: Path, precision: str) -> str:
    """What determines CLIP's outputs: the family, its config, its weight files' bytes, the precision."""
    digest = hashlib.sha256(b"clip|" + precision.encode())
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json", ".txt"):
            digest.update(f.name.encode())
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def load_clip(source: str | Path, placement: Placement) -> ClipBaseline:
    """A CLIP baseline from a local directory or a cached hub id, at `placement` (fp32, bf16 or fp16)."""
    from transformers import AutoTokenizer, CLIPModel

    from .backbones import load_image_processor

    if placement.precision == "int8":
        raise FromageInputError("precision=int8", "the clip family runs at fp32, bf16 or fp16 only")
    path = resolve_clip_source(source)
    try:
        clip = CLIPModel.from_pretrained(str(path), dtype=placement.dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise FromageInputError(path, f"cannot load the CLIP model or its tokenizer: {err}") from None
    clip = clip.to(placement.device).eval().requires_grad_(False)
    return ClipBaseline(clip, tokenizer, load_image_processor(path), placement, _fingerprint(path, placement.precision),
                        str(source))
