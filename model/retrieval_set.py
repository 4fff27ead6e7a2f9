"""The image set `[RET]` retrieves from: a matrix of retrieval-space image embeddings plus their paths.

On disk: `retrieval_embeddings.safetensors` (tensor "embeddings", (N, D)) and `retrieval_paths.json`:
`{"paths": [N strings], "image_root": dir or null, "count": N, ...provenance}` (a bare JSON list of paths is
read too). `image_root` resolves relative paths. Provenance, written by `fromage-bench build-retrieval-set`:
`model_identity` (`Fromage.model_identity` of the model that embedded the images: what determines its
retrieval-space image embeddings, not its precision), `preprocessing` (`model.images.CROP` or `SQUASH`) and
`built_with` (precision, device, fromage-bench version, backbone names: information only). A set without a
`model_identity` (written before provenance existed, or converted by `convert-embeddings`, which records
`"source": "original pickle"`) has unknown provenance: it loads, with a warning. No pickle: the original
`cc3m_embeddings*.pkl` files are converted once by `fromage-bench convert-embeddings --trust-pickle`.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save

from .errors import FromageInputError, read_json
from .files import atomic_write_bytes, atomic_write_text

EMBEDDINGS_FILE = "retrieval_embeddings.safetensors"
PATHS_FILE = "retrieval_paths.json"
PROVENANCE_KEYS = ("model_identity", "preprocessing", "built_with", "source")
FOREIGN_HINT = ("rebuild it for this model with `fromage-bench build-retrieval-set`, or pass "
                "--accept-foreign-retrieval-set / accept_foreign_retrieval_set=True to use it anyway")

log = logging.getLogger(__name__)


@dataclass
class RetrievalSet:
    paths: list[str]
    embeddings: torch.Tensor  # (N, D), as computed by get_visual_embs(mode="retrieval"), not normalised
    image_root: str | None = None
    provenance: dict | None = None  # PROVENANCE_KEYS that are known (see the module docstring)
    source: str | None = field(default=None, compare=False)  # the paths file it was loaded from, for messages

    def __post_init__(self):
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but embeddings of shape {tuple(self.embeddings.shape)}")

    def __len__(self) -> int:
        return len(self.paths)

    def resolve(self, index: int) -> str:
        path = self.paths[index]
        if self.image_root and not os.path.isabs(path) and "://" not in path:
            return os.path.join(self.image_root, path)
        return path

    def check_provenance(self, model_identity: str, preprocessing: str, accept_foreign: bool = False) -> None:
        """Bad input (naming the set's paths file and both identities) unless the set was built by the model
        `model_identity` with the image preprocessing `preprocessing`, or `accept_foreign`. Unknown provenance
        (no recorded identity) is accepted with a warning: the original's pickles record none."""
        where = self.source or "retrieval set"
        built = self.provenance or {}
        if not built.get("model_identity"):
            log.warning("%s: provenance unknown (%s): cannot check that its embeddings come from this model", where,
                        built.get("source") or "no model identity recorded")
            return
        mismatches = []
        if built["model_identity"] != model_identity:
            mismatches.append(f"built by model {built['model_identity']}, but this model is {model_identity}")
        if built.get("preprocessing") != preprocessing:
            mismatches.append(f"images prepared by {built.get('preprocessing')!r}, but this model's [RET] "
                              f"retrieval expects {preprocessing!r}")
        if not mismatches:
            return
        if not accept_foreign:
            raise FromageInputError(where, "; ".join(mismatches), FOREIGN_HINT)
        log.warning("%s: %s (accepted: --accept-foreign-retrieval-set)", where, "; ".join(mismatches))

    def save(self, directory: str | Path) -> Path:
        """Write the set. The paths file goes last and is removed first: a directory whose write was
        interrupted holds no paths file, so it does not load (no old paths paired with new embeddings)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PATHS_FILE).unlink(missing_ok=True)
        atomic_write_bytes(directory / EMBEDDINGS_FILE, save({"embeddings": self.embeddings.float().contiguous().cpu()}))
        known = {k: v for k, v in (self.provenance or {}).items() if k in PROVENANCE_KEYS and v is not None}
        atomic_write_text(directory / PATHS_FILE, json.dumps({"paths": self.paths, "image_root": self.image_root,
                                                              "count": len(self.paths), **known}))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "RetrievalSet":
        directory = Path(directory)
        emb_path, paths_path = directory / EMBEDDINGS_FILE, directory / PATHS_FILE
        for required in (emb_path, paths_path):
            if not required.is_file():
                raise FromageInputError(required, "missing", "a retrieval set is a directory written by convert-embeddings")
        meta = read_json(paths_path)
        if isinstance(meta, list):
            meta = {"paths": meta}
        if not isinstance(meta, dict) or not isinstance(meta.get("paths"), list):
            raise FromageInputError(paths_path, 'expected {"paths": [...]} or a JSON list of paths')
        if meta.get("count") is not None and meta["count"] != len(meta["paths"]):
            raise FromageInputError(paths_path, f"count says {meta['count']} but {len(meta['paths'])} paths are listed")
        provenance = {k: meta[k] for k in PROVENANCE_KEYS if meta.get(k) is not None} or None
        try:
            tensors = load_file(str(emb_path))
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise FromageInputError(emb_path, f"not a readable safetensors file: {err}") from None
        if "embeddings" not in tensors:
            raise FromageInputError(emb_path, f'no tensor named "embeddings" (found: {sorted(tensors)})')
        try:
            return cls([str(p) for p in meta["paths"]], tensors["embeddings"], meta.get("image_root"), provenance,
                       source=str(paths_path))
        except ValueError as err:
            raise FromageInputError(directory, str(err)) from None

    def save_original_pickle(self, path: str | Path) -> Path:
        """Write the set as one of the original's `cc3m_embeddings*.pkl` files (the format `from_original_pickles`
        reads): a pickled dict of `paths` (resolved against `image_root`, so the original code opens them) and
        `embeddings`, an (N, D) float32 numpy array. Only for the original code: this project loads the
        safetensors set and never unpickles by default."""
        data = {"paths": [self.resolve(i) for i in range(len(self))],
                "embeddings": self.embeddings.float().cpu().numpy()}
        return atomic_write_bytes(Path(path), pickle.dumps(data, protocol=4))

    @classmethod
    def from_original_pickles(cls, pickle_paths: Sequence[str | Path], *, trust_pickle: bool = False) -> "RetrievalSet":
        """Read the original `cc3m_embeddings*.pkl` files. Unpickling runs arbitrary code, hence the opt-in."""
        if not trust_pickle:
            raise FromageInputError(pickle_paths[0] if pickle_paths else "cc3m_embeddings*.pkl",
                                    "refusing to unpickle: pickle files can run arbitrary code",
                                    "pass --trust-pickle (trust_pickle=True) only for files from a source you trust")
        paths: list[str] = []
        chunks = []
        for path in pickle_paths:
            try:
                with open(path, "rb") as f:
                    data = pickle.load(f)  # noqa: S301 - explicitly opted in above
            except FileNotFoundError:
                raise FromageInputError(path, "file not found") from None
            except Exception as err:
                raise FromageInputError(path, f"not a readable pickle: {err}") from None
            if not isinstance(data, dict) or "paths" not in data or "embeddings" not in data:
                raise FromageInputError(path, "expected a dict with 'paths' and 'embeddings'")
            paths.extend(str(p) for p in data["paths"])
            chunks.append(np.asarray(data["embeddings"], dtype=np.float32).reshape(len(data["paths"]), -1))
        embeddings = torch.from_numpy(np.concatenate(chunks))
        try:
            return cls(paths, embeddings, provenance={"source": "original pickle"})
        except ValueError as err:
            raise FromageInputError(pickle_paths[0], str(err)) from None
