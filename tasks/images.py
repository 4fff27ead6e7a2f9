"""Images of a dataset: paths confined to their image directory, decoding that reports (not raises)
per-example faults, and content hashes for the feature cache."""
from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from model.errors import FromageInputError
from model.images import load_image


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


def try_load(path: Path | None) -> tuple[Image.Image | None, str | None]:
    """(image, None) or (None, reason) for a missing or corrupt file."""
    if path is None or not Path(path).is_file():
        return None, "missing image"
    try:
        return load_image(path), None
    except FromageInputError:
        return None, "corrupt image"


def content_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
