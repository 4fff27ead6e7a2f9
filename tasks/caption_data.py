"""Loaders of the two image-caption formats shared by `image_text_retrieval` and `captioning`.

* ``cc3m``: a CC3M-validation-style TSV (as the original repo's ``datasets/cc3m_val.tsv``): a header line
  naming the columns ``caption`` and ``image`` (other columns are ignored) then one row per example, read
  by `model.datasets.read_cc3m_rows` as the original's ``pandas.read_csv(sep='\t')`` reads it: CSV quoting
  is honoured (a caption holding ``"`` or a tab is written quoted by pandas, its inner quotes doubled),
  every field stays the string written. The image column is a file name relative to the image directory,
  possibly without its extension (the released TSV lists ``0_1595581236``): it is tried as given, then
  with ``.jpg`` / ``.png`` (and ``.jpeg``). Rows naming the same image file are grouped into one image
  with several captions (the original's validation grouped BLEU references by image path the same way).
  ``limit`` counts rows (= captions).
* ``coco``: a Karpathy-split JSON (``dataset_coco.json``: ``{"images": [{"filepath", "filename", "split",
  "sentences": [{"raw", ...}], "cocoid"?}]}``); only images whose ``split`` is ``"test"`` are used, at
  ``{image_root}/{filepath}/{filename}``. Flickr30k's Karpathy file (``dataset_flickr30k.json``) has the
  same structure without ``filepath``/``cocoid``: it loads as well (images at ``{image_root}/{filename}``,
  ids from ``imgid``) by pointing the coco setting's two paths at it: with ``--data-root`` plus a per-file
  path override once the runner offers one; until then, by laying it out as ``coco/dataset_coco.json``
  with the images directly under ``coco/``. ``limit`` counts test images.

Malformed files raise `FromageInputError` naming the file (and line / entry). Missing or corrupt image
files are not errors here: the image keeps a path that does not open, and the task counts it as skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model.datasets import ImageDir, read_cc3m_rows, resolve_image
from model.errors import FromageInputError, read_json


@dataclass
class CaptionedImage:
    """One image and its reference captions, in file order."""
    image_id: str             # cc3m: the image column as written; coco: cocoid (or imgid, or the file name)
    name: str                 # the image's path relative to its image directory, as the data file names it
    path: Path                # the file to open (it may be missing or corrupt: the task then skips the image)
    captions: list[str] = field(default_factory=list)
    where: str = ""           # "file, line N" / "file, images[i]": for messages


# -- cc3m -------------------------------------------------------------------------------------------------
def load_cc3m(tsv: Path, image_dir: Path, limit: int | None = None) -> list[CaptionedImage]:
    """The first `limit` rows of a CC3M-style TSV, grouped by image file (file order of first mention)."""
    rows = read_cc3m_rows(tsv)
    if limit is not None:
        rows = rows[:limit]
    images = ImageDir(image_dir)
    by_path: dict[Path, CaptionedImage] = {}
    for line, caption, name in rows:
        where = f"{tsv}, line {line}"
        path = resolve_image(images, name, where)
        item = by_path.get(path)
        if item is None:
            item = by_path[path] = CaptionedImage(image_id=name, name=name, path=path, where=where)
        item.captions.append(caption)
    return list(by_path.values())


# -- coco / Karpathy split --------------------------------------------------------------------------------
def read_karpathy(json_path: Path) -> list[dict]:
    """The `images` list of a Karpathy-split JSON, checked for the fields the tasks use."""
    json_path = Path(json_path)
    data = read_json(json_path, "Karpathy split JSON not found", "expected dataset_coco.json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise FromageInputError(json_path, "expected an object with an `images` list (Karpathy split format)")
    for i, entry in enumerate(data["images"]):
        where = f"{json_path}, images[{i}]"
        if not isinstance(entry, dict):
            raise FromageInputError(where, "expected an object")
        for key in ("filename", "split"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise FromageInputError(where, f"missing or non-string `{key}`")
        if "filepath" in entry and not isinstance(entry["filepath"], str):
            raise FromageInputError(where, "`filepath` must be a string")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise FromageInputError(where, "missing `sentences` list")
        for j, sentence in enumerate(sentences):
            if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                raise FromageInputError(f"{where}.sentences[{j}]", "expected an object with a string `raw`")
    return data["images"]


def karpathy_id(entry: dict) -> str:
    for key in ("cocoid", "imgid"):
        if key in entry:
            return str(entry[key])
    return entry["filename"]


def load_karpathy(json_path: Path, image_root: Path, split: str = "test", limit: int | None = None,
                  no_captions: list[str] | None = None) -> list[CaptionedImage]:
    """The first `limit` images of `split`, each with its raw sentences. Entries without any non-empty
    sentence cannot be scored: their ids are appended to `no_captions` (when given) and left out."""
    entries = [(i, e) for i, e in enumerate(read_karpathy(json_path)) if e["split"] == split]
    if limit is not None:
        entries = entries[:limit]
    images = ImageDir(image_root)
    out = []
    for i, entry in entries:
        where = f"{json_path}, images[{i}]"
        name = f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
        captions = [s["raw"].strip() for s in entry["sentences"] if s["raw"].strip()]
        path = resolve_image(images, name, where)
        if not captions:
            if no_captions is not None:
                no_captions.append(karpathy_id(entry))
            continue
        out.append(CaptionedImage(image_id=karpathy_id(entry), name=name, path=path, captions=captions, where=where))
    return out


# -- both -------------------------------------------------------------------------------------------------
SETTINGS = ("cc3m", "coco")
FILES = {
    "cc3m/captions": "cc3m/cc3m_val.tsv",
    "cc3m/images": "cc3m/validation",
    "coco/captions": "coco/dataset_coco.json",
    "coco/images": "coco",
}


def load_setting(task, ctx, setting: str, skipped=None) -> list[CaptionedImage]:
    """The images and captions of a setting, located through the task's file table; `limit` counts
    rows for cc3m and test images for coco. Karpathy entries without captions go to `skipped`."""
    captions, image_dir = task.path(ctx, "captions", setting), task.path(ctx, "images", setting)
    if setting == "cc3m":
        return load_cc3m(captions, image_dir, ctx.limit)
    if setting == "coco":
        no_captions: list[str] = []
        items = load_karpathy(captions, image_dir, "test", ctx.limit, no_captions)
        if skipped is not None:
            for image_id in no_captions:
                skipped.add("no reference captions", image_id)
        return items
    raise FromageInputError(f"setting {setting!r}", f"unknown setting of {task.name}", f"valid settings: {', '.join(SETTINGS)}")
