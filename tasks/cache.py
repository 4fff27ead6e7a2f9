"""On-disk cache of per-image CLIP features, keyed by model fingerprint (which includes the precision), image
preprocessing (`model.images`: crop or squash) and image content hash, so a second run and other tasks reuse them."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save

from model.datasets import content_hash
from model.files import atomic_write_bytes
from model.images import CROP, check_preprocess


class FeatureCache:
    def __init__(self, root: Path, fingerprint: str):
        self.dir = Path(root) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _file(self, digest: str, preprocess: str) -> Path:
        return self.dir / check_preprocess(preprocess) / digest[:2] / f"{digest}.safetensors"

    def get(self, digest: str, preprocess: str) -> torch.Tensor | None:
        f = self._file(digest, preprocess)
        if not f.is_file():
            return None
        try:
            return load_file(str(f))["features"]
        except Exception:  # a torn write from a killed run: recompute
            return None

    def put(self, digest: str, preprocess: str, features: torch.Tensor) -> None:
        f = self._file(digest, preprocess)
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(f, save({"features": features.detach().float().cpu().contiguous()}), durable=False)


def content_hashes(paths: Sequence[Path | None], cache: FeatureCache | None) -> list[str | None]:
    """The cache keys of `paths` (None without a cache, or for a file that is not there)."""
    return [content_hash(p) if cache is not None and p is not None and Path(p).is_file() else None for p in paths]


def load_features(model, paths: Sequence[Path | None], cache: FeatureCache | None = None, batch_size: int = 32,
                  workers: int | None = None, preprocess: str = CROP, digests: Sequence[str | None] | None = None
                  ) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Pooled CLIP features (float32, CPU) of image files prepared as `preprocess` says, by index, and the reason
    for each file that could not be used ("missing image" / "corrupt image" / "image too large"). Cached features
    skip decoding altogether; the rest are decoded by `workers` DataLoader processes (see
    `Fromage.image_file_features`) and cached as each batch comes, so an interrupted run keeps what it computed.
    `digests`: the files' `content_hashes`, when the caller has them already."""
    features: dict[int, torch.Tensor] = {}
    failures: dict[int, str] = {}
    todo: list[tuple[int, str | None, Path]] = []  # (index, content hash, path) of files to decode
    digests = content_hashes(paths, cache) if digests is None else digests
    for i, (path, digest) in enumerate(zip(paths, digests, strict=True)):
        if path is None or not Path(path).is_file():
            failures[i] = "missing image"
            continue
        cached = cache.get(digest, preprocess) if cache is not None else None
        if cached is not None:
            features[i] = cached
            cache.hits += 1
            continue
        todo.append((i, digest, path))
    if not todo:
        return features, failures
    for positions, fresh, failed in model.image_file_features([p for _, _, p in todo], batch_size, workers,
                                                              preprocess=preprocess):
        for position, feats in zip(positions, fresh.float().cpu()):
            i, digest, _ = todo[position]
            features[i] = feats
            if cache is not None:
                cache.misses += 1
                cache.put(digest, preprocess, feats)
        for position, reason in failed.items():
            failures[todo[position][0]] = reason
    return features, failures


def load_features_per_preprocess(model, paths: Sequence[Path | None], preprocessings, cache: FeatureCache | None = None,
                                 batch_size: int = 32, workers: int | None = None
                                 ) -> tuple[dict[str, dict[int, torch.Tensor]], dict[int, str]]:
    """`load_features` once per preprocessing (protocols that prepare images differently): features by
    preprocessing, then by index, for the indices readable under all of them, and the failures of the others
    (so that every protocol sees the same examples)."""
    by_preprocess, failures = {}, {}
    digests = content_hashes(paths, cache)  # each file read once for its hash, whatever the preprocessings
    for preprocess in dict.fromkeys(preprocessings):
        by_preprocess[preprocess], failed = load_features(model, paths, cache, batch_size, workers, preprocess,
                                                          digests)
        failures.update({i: reason for i, reason in failed.items() if i not in failures})
    return ({preprocess: {i: f for i, f in features.items() if i not in failures}
             for preprocess, features in by_preprocess.items()}, failures)
