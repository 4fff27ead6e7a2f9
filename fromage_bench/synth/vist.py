"""A small Visual Storytelling (VIST) SIS val set in the real file format and the official layout.

Layout under `root` (the `vist_retrieval` task's defaults):

    vist/sis/val.story-in-sequence.json   {"info", "type", "albums", "images", "annotations"}
    vist/images/val/{photo_flickr_id}.jpg  (or .png)

As in VIST, every album holds a few photos and several stories are told over the same album, so photos
are shared between stories. Each annotation is a one-element list of {story_id, storylet_id,
photo_flickr_id, album_id, worker_arranged_photo_order, text, original_text, ...}; `text` is the
lower-cased, space-tokenised form of `original_text`. The images are plain coloured shapes drawn with
PIL in the centre square of JPEGs of several sizes and aspect ratios (about one in three awkward:
greyscale, CMYK, 20x15, 3000x2000, a panorama), written by the shared writers (`formats`, `images`);
the sentences describe them.

Faults that can be planted: `missing` photos without a file, `corrupt` photos whose file is truncated,
`png` photos saved as `.png`; `unused` extra photos listed in `images` (with a file) that no story uses
(album photos no story picked are unused as well);
`shuffled=True` writes each story's annotations in a scrambled order (`worker_arranged_photo_order`
keeps the true order).
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from . import formats, images

JSON_PATH = "vist/sis/val.story-in-sequence.json"
IMAGE_DIR = "vist/images/val"

_COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 210, 40),
            "purple": (140, 50, 170), "orange": (240, 140, 30), "black": (20, 20, 20), "pink": (240, 130, 180)}
_BACKGROUNDS = [(250, 250, 250), (200, 200, 200), (170, 210, 240), (220, 240, 200)]
_SHAPES = ["circle", "square", "triangle", "diamond"]
_SIZES = ["small", "big"]
_OPENERS = ["we saw a {d} .", "then there was a {d} .", "next to it stood a {d} .", "later we found a {d} .",
            "at the end we saw a {d} ."]
PHOTOS_PER_ALBUM = 7
STORIES_PER_ALBUM = 2


def _draw(colour: str, shape: str, size: str, background: tuple[int, int, int], side: int = 72) -> Image.Image:
    """The shape on a `side` square (laid out for 72 pixels, scaled)."""
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    r = max(1, round((14 if size == "small" else 30) * side / 72))
    cx = cy = side // 2
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = _COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image


def _write_photo(image_dir: Path, pid: str, look_of: tuple[str, str, str, tuple[int, int, int]],
                 look: images.ImageLook, kind: str | None, png_faults: list) -> str:
    """Write one photo (or not, for `missing`); returns its file extension."""
    colour, shape, size, background = look_of
    if kind == "png":
        look = images.png_fault_look(look, len(png_faults))
        png_faults.append(pid)
    picture = images.compose(look, background, lambda side: _draw(colour, shape, size, background, side),
                             random.Random(f"vist-photo:{pid}"))
    images.save_image(picture, image_dir / pid, look, kind if kind in ("missing", "corrupt") else None)
    return look.ext


def write_vist(root: Path, *, n: int = 6, seed: int = 0, missing: int = 0, corrupt: int = 0, png: int = 0,
               unused: int = 1, shuffled: bool = False) -> dict:
    """Write `n` five-photo stories (and their photos) under `root`; deterministic for `seed`.

    Faults go to different stories, in story order: the first `missing` stories lose a context photo
    file, the next `corrupt` stories get a truncated target photo, the next `png` stories have a photo
    saved as .png (still readable). A faulty photo may be shared with other stories, which are then
    skipped as well: `skipped` lists every story that must be skipped, with the reason of its first
    faulty photo in story order.

    Returns {"root", "json", "image_dir", "story_ids" (file order), "stories" {story_id: photo ids in
    story order}, "captions" {story_id: texts in story order}, "targets" {story_id: last photo id},
    "missing", "corrupt", "png", "unused" (photo ids; unused = every listed photo no story uses),
    "skipped" {story_id: reason}, "pool" (readable photos used by some story, in `images` list order)}.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if missing + corrupt + png > n:
        raise ValueError("at most one planted fault per story: missing + corrupt + png must be <= n")
    rng = random.Random(seed)
    root = Path(root)
    json_path = root / JSON_PATH
    image_dir = root / IMAGE_DIR
    json_path.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)

    combos = [(c, s, z) for c in _COLOURS for s in _SHAPES for z in _SIZES]
    rng.shuffle(combos)
    n_albums = -(-n // STORIES_PER_ALBUM)
    photo_ids = [str(i) for i in rng.sample(range(1_000_000_000, 9_999_999_999), n_albums * PHOTOS_PER_ALBUM + unused)]
    album_ids = [str(72157600000000000 + rng.randrange(10 ** 10)) for _ in range(n_albums)]
    looks: dict[str, tuple[str, str, str, tuple[int, int, int]]] = {}
    album_of: dict[str, str] = {}
    album_photos: list[list[str]] = []
    for a, album_id in enumerate(album_ids):
        photos = photo_ids[a * PHOTOS_PER_ALBUM:(a + 1) * PHOTOS_PER_ALBUM]
        album_photos.append(photos)
        for pid in photos:
            album_of[pid] = album_id
    unused_ids = photo_ids[n_albums * PHOTOS_PER_ALBUM:]
    for pid in unused_ids:
        album_of[pid] = album_ids[0]
    for i, pid in enumerate(photo_ids):
        colour, shape, size = combos[i % len(combos)]
        looks[pid] = (colour, shape, size, _BACKGROUNDS[rng.randrange(len(_BACKGROUNDS))])

    story_ids = [str(40000 + 5 * i + rng.randrange(5)) for i in range(n)]
    stories: dict[str, list[str]] = {}
    captions: dict[str, list[str]] = {}
    originals: dict[str, list[str]] = {}
    for i, sid in enumerate(story_ids):
        photos = rng.sample(album_photos[i // STORIES_PER_ALBUM], 5)
        stories[sid] = photos
        texts = []
        for k, pid in enumerate(photos):
            colour, shape, size, _ = looks[pid]
            texts.append(_OPENERS[k].format(d=f"{size} {colour} {shape}"))
        captions[sid] = texts
        originals[sid] = [formats.original_text(t) for t in texts]

    # Faults: one per story, on a photo no earlier fault took.
    planted: dict[str, str] = {}
    fault_plan = ["missing"] * missing + ["corrupt"] * corrupt + ["png"] * png
    positions = {"missing": [1, 0, 2, 3, 4], "corrupt": [4, 3, 2, 1, 0], "png": [2, 0, 1, 3, 4]}
    for sid, kind in zip(story_ids, fault_plan):
        pid = next((stories[sid][k] for k in positions[kind] if stories[sid][k] not in planted), None)
        if pid is None:
            raise ValueError(f"cannot plant a {kind} photo in story {sid}: all its photos already carry a fault")
        planted[pid] = kind

    used = {pid for photos in stories.values() for pid in photos}
    file_looks = images.fixture_looks(f"vist:{seed}", len(photo_ids))
    png_faults: list[str] = []
    ext = {pid: _write_photo(image_dir, pid, looks[pid], file_looks[i], planted.get(pid), png_faults)
           for i, pid in enumerate(photo_ids)}

    photos = []
    for pid in photo_ids:
        colour, shape, size, _ = looks[pid]
        taken = f"2011-0{1 + rng.randrange(9)}-1{rng.randrange(10)} 12:00:00"
        photos.append(formats.VistPhoto(pid, album_of[pid], f"{colour} {shape}", f"{colour} {shape} {size}", taken,
                                        ext[pid]))
    albums = [formats.VistAlbum(album_id, f"album {a}", tuple(album_photos[a])) for a, album_id in enumerate(album_ids)]
    annotated = []
    for i, sid in enumerate(story_ids):
        order = list(range(5))
        if shuffled:
            while order == sorted(order):
                rng.shuffle(order)
        annotated.append(formats.VistStory(sid, tuple(stories[sid]), tuple(captions[sid]), tuple(originals[sid]),
                                           f"WORKER{i:04d}", 200000 + 5 * i, tuple(order)))
    formats.write_vist_sis(json_path, "synthetic VIST SIS val set (fromage-bench)", albums, photos, annotated)

    skipped = {}
    for sid in story_ids:
        reason = next((planted[pid] for pid in stories[sid] if planted.get(pid) in ("missing", "corrupt")), None)
        if reason:
            skipped[sid] = f"{reason} image"
    pool = [pid for pid in photo_ids if pid in used and planted.get(pid) not in ("missing", "corrupt")]
    return {"root": root, "json": json_path, "image_dir": image_dir, "story_ids": story_ids, "stories": stories,
            "captions": captions, "targets": {sid: stories[sid][-1] for sid in story_ids},
            "missing": [p for p, k in planted.items() if k == "missing"],
            "corrupt": [p for p, k in planted.items() if k == "corrupt"],
            "png": [p for p, k in planted.items() if k == "png"], "unused": [p for p in photo_ids if p not in used],
            "skipped": skipped, "pool": pool}
