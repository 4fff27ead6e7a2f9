"""Small synthetic image-caption datasets in the real formats and layouts of CC3M validation and the
Karpathy COCO split: coloured shapes drawn with PIL, captions that describe them.

Layouts (under `root`, as the `captioning` / `image_text_retrieval` tasks expect them by default):

* ``cc3m/cc3m_val.tsv`` (header ``caption<TAB>image``, written by pandas; image names mostly with their
  extension, some without like the released file) and images ``cc3m/validation/<name>.jpg``;
* ``coco/dataset_coco.json`` (Karpathy format: test images plus a few train/restval/val entries) and
  images ``coco/val2014/COCO_val2014_<cocoid:012d>.jpg``.

The files are written by the shared writers (`formats`, `images`): JPEGs of several sizes and aspect
ratios, about one in three of them awkward (greyscale, CMYK, 20x15, 3000x2000, a panorama); the shape is
drawn in the centre square.

Faults (counts of distinct examples, chosen by the seed and returned by id): ``missing`` (no image file),
``corrupt`` (a truncated JPEG), ``png`` (the image saved as PNG, palette / RGBA / RGB, under a `.png` name
instead of `.jpg`).
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from . import formats, images

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (240, 200, 20),
           "purple": (148, 103, 189), "orange": (255, 127, 14)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "stripe")
TEMPLATES = ("a {colour} {shape} on a {background} background.",
             "A {colour} {shape} in front of a {background} wall",
             "there is a {colour} {shape} in this picture .",
             "picture of a {colour} {shape}, {background} backdrop",
             "a simple {shape} painted {colour}")


def draw_shape(colour: str, shape: str, background: str, size: tuple[int, int] = (96, 72),
               offset: int = 0) -> Image.Image:
    """A `background` image with one `colour` `shape` near its centre (`offset` moves it a little)."""
    w, h = size
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    cx, cy, r = w // 2 + offset, h // 2 - offset // 2, min(w, h) // 3
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        for x in range(0, w, 12):
            draw.rectangle([x, 0, x + 5, h], fill=fill)
    return image


def _scene(rng: random.Random, i: int) -> tuple[str, str, str, int]:
    colours, shapes, backgrounds = list(COLOURS), list(SHAPES), list(BACKGROUNDS)
    # walk the combinations so that consecutive images always differ, with a seeded start and offset
    start = rng.randrange(len(colours) * len(shapes))
    k = start + i
    return (colours[k % len(colours)], shapes[(k // len(colours)) % len(shapes)],
            backgrounds[(k + i) % len(backgrounds)], rng.randrange(-6, 7))


def _captions(rng: random.Random, colour: str, shape: str, background: str, count: int) -> list[str]:
    order = rng.sample(range(len(TEMPLATES)), len(TEMPLATES))
    return [TEMPLATES[order[j % len(order)]].format(colour=colour, shape=shape, background=background)
            for j in range(count)]


def _pick_faults(rng: random.Random, n: int, **counts: int) -> dict[str, list[int]]:
    total = sum(counts.values())
    if total > n:
        raise ValueError(f"{total} faulty examples requested but only {n} examples")
    chosen = rng.sample(range(n), total)
    out, at = {}, 0
    for fault, count in counts.items():
        out[fault] = sorted(chosen[at:at + count])
        at += count
    return out


def _write_image(colour: str, shape: str, background: str, offset: int, path: Path, look: images.ImageLook,
                 fault: str | None, png_faults: list) -> Path | None:
    """The shape drawn in the centre square of `look`'s canvas, saved as JPEG, or as PNG under a .png name
    for the `png` fault (the k-th one in palette / RGBA / RGB mode)."""
    if fault == "png":
        look = images.png_fault_look(look, len(png_faults))
        png_faults.append(path)
        fault = None
    paint = lambda side: draw_shape(colour, shape, background, (side, side), round(offset * side / 96))  # noqa: E731
    picture = images.compose(look, BACKGROUNDS[background], paint, random.Random(str(path.name)))
    return images.save_image(picture, path, look, fault)


AWKWARD_CAPTIONS = ('a "{colour}" {shape}, as the uploader put it', 'a {colour} {shape}\tbetween tabs')


def _awkward(k: int, colour: str, shape: str) -> str:
    """The k-th awkward caption (opt-in): double quotes, then a tab, by turns; pandas quotes both."""
    return AWKWARD_CAPTIONS[k % len(AWKWARD_CAPTIONS)].format(colour=colour, shape=shape)


def write_cc3m(root: Path, *, n: int = 12, seed: int = 0, missing: int = 0, corrupt: int = 0, png: int = 0,
               extensions_in_tsv: bool | None = None, awkward_captions: int = 0) -> dict:
    """`root/cc3m/cc3m_val.tsv` + `root/cc3m/validation/` with `n` images, one caption each.

    `extensions_in_tsv`: True names every image with `.jpg` in the TSV, False none, None (default) most
    (as real exports) and some not (as the released cc3m_val.tsv). `awkward_captions`: that many captions
    (opt-in) hold double quotes or a tab, which pandas writes quoted.

    Returns ``{"tsv", "image_dir", "ids" (TSV image column, file order), "captions", "files" (id -> path
    written or None), "missing", "corrupt", "png" (ids)}``."""
    rng = random.Random(seed)
    root = Path(root)
    image_dir = root / "cc3m" / "validation"
    image_dir.mkdir(parents=True, exist_ok=True)
    faults = _pick_faults(rng, n, missing=missing, corrupt=corrupt, png=png)
    fault_of = {i: f for f, idx in faults.items() for i in idx}
    awkward = set(rng.sample(range(n), min(n, awkward_captions))) if awkward_captions else set()
    looks = images.fixture_looks(f"cc3m:{seed}", n)
    names, captions, written, png_faults = [], [], [], []
    for i in range(n):
        colour, shape, background, offset = _scene(rng, i)
        name = f"{i}_{rng.randrange(10**9, 10**10)}"
        written.append(_write_image(colour, shape, background, offset, image_dir / f"{name}.jpg", looks[i],
                                    fault_of.get(i), png_faults))
        names.append(f"{name}.jpg")
        text = _captions(rng, colour, shape, background, 1)[0]
        captions.append(_awkward(sorted(awkward).index(i), colour, shape) if i in awkward else text)
    if extensions_in_tsv is None:
        column = formats.tsv_image_names(names, random.Random(f"cc3m-names:{seed}"))
    else:
        column = names if extensions_in_tsv else [Path(name).stem for name in names]
    tsv = formats.write_cc3m_tsv(root / "cc3m" / "cc3m_val.tsv", captions, column)
    return {"tsv": tsv, "image_dir": image_dir, "ids": column, "captions": captions,
            "files": dict(zip(column, written)), **{fault: [column[i] for i in idx] for fault, idx in faults.items()}}


def write_coco_karpathy(root: Path, *, n: int = 8, seed: int = 0, captions_per_image: int = 5, n_other: int = 3,
                        missing: int = 0, corrupt: int = 0, png: int = 0) -> dict:
    """`root/coco/dataset_coco.json` (Karpathy format) with `n` test images of `captions_per_image`
    sentences each, plus `n_other` entries of the train/restval/val splits (their images are written too).

    Returns ``{"json", "image_root", "ids" (test cocoids as strings, file order), "captions" (id -> raw
    sentences), "files" (id -> path written or None), "missing", "corrupt", "png" (test ids)}``."""
    rng = random.Random(seed)
    root = Path(root)
    image_root = root / "coco"
    faults = _pick_faults(rng, n, missing=missing, corrupt=corrupt, png=png)
    fault_of = {i: f for f, idx in faults.items() for i in idx}
    others = ("train", "restval", "val")
    # interleave the other splits with the test images, as the real file mixes them
    splits = ["test"] * n
    for j in range(n_other):
        splits.insert(rng.randrange(len(splits) + 1), others[j % len(others)])
    looks = images.fixture_looks(f"coco:{seed}", len(splits))
    entries, ids, captions, files, png_faults = [], [], {}, {}, []
    test_index = 0
    for imgid, split in enumerate(splits):
        colour, shape, background, offset = _scene(rng, imgid)
        cocoid = 100000 + 37 * imgid + rng.randrange(30)
        filepath = "train2014" if split == "train" else "val2014"
        filename = formats.coco_filename(filepath, cocoid)
        fault = fault_of.get(test_index) if split == "test" else None
        written = _write_image(colour, shape, background, offset, image_root / filepath / filename, looks[imgid],
                               fault, png_faults)
        raws = _captions(rng, colour, shape, background, captions_per_image)
        entries.append(formats.CocoImage(filepath, filename, cocoid, split, tuple(raws)))
        if split == "test":
            ids.append(str(cocoid))
            captions[str(cocoid)] = raws
            files[str(cocoid)] = written
            test_index += 1
    path = formats.write_coco_karpathy_json(image_root / "dataset_coco.json", entries)
    return {"json": path, "image_root": image_root, "ids": ids, "captions": captions, "files": files,
            **{fault: [ids[i] for i in idx] for fault, idx in faults.items()}}
