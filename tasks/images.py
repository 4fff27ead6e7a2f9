"""Images of a dataset: paths confined to their image directory, and content hashes for the feature cache.
(Decoding that reports, not raises, per-example faults is `model.images.try_load`.)"""
from __future__ import annotations

import hashlib
from pathlib import Path

from model.errors import FromageInputError


class ImageDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FromageInputError(self.root, "image directory missing")
        self._resolved_root = self.root.resolve()

    def path(self, relative: str, source: str | Path = "") -> Path:
        """The file for a dataset-relative name; a name escaping the directory ('../', absolute) is bad input."""
        candidate = (self.root / relative).resolve()
        if self._resolved_root not in candidate.parents:
            raise FromageInputError(source or self.root, f"image path {relative!r} escapes the image directory {self.root}")
        return candidate

    def find(self, stem: str, extensions: tuple[str, ...] = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")) -> Path | None:
        """First existing `stem + ext` (VIST ships both .jpg and .png)."""
        for ext in extensions:
            p = self.path(stem + ext)
            if p.is_file():
                return p
        return None


def content_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
