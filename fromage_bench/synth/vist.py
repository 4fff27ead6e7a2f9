"""A small Visual Storytelling (VIST) SIS val set in the real file format and the official layout.

Layout under `root` (the `vist_retrieval` task's defaults):

    vist/sis/val.story-in-sequence.json   {"info", "type", "albums", "images", "annotations"}
    vist/images/val/{photo_flickr_id}.jpg  (or .png)

As in VIST, every album holds a few photos and several stories are told over the same album, so photos
are shared between stories. Each annotation is a one-element list of {story_id, storylet_id,
photo_flickr_id, album_id, worker_arranged_photo_order, text, original_text, ...}; `text` is the
lower-cased, space-tokenised form of `original_text`. The images are plain coloured shapes drawn with
PIL and the sentences describe them.

Faults that can be planted: `missing` photos without a file, `corrupt` photos whose file is truncated,
`png` photos saved as `.png`; `unused` extra photos listed in `images` (with a file) that no story uses
(album photos no story picked are unused as well);
`shuffled=True` writes each story's annotations in a scrambled order (`worker_arranged_photo_order`
keeps the true order).
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

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


def _draw(colour: str, shape: str, size: str, background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (96, 72), background)
    draw = ImageDraw.Draw(image)
    r = 14 if size == "small" else 30
    cx, cy = 48, 36
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
        originals[sid] = [t[0].upper() + t[1:-2] + "." for t in texts]

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
    for pid in photo_ids:
        colour, shape, size, background = looks[pid]
        image = _draw(colour, shape, size, background)
        kind = planted.get(pid)
        if kind == "missing":
            continue
        if kind == "png":
            image.save(image_dir / f"{pid}.png")
        elif kind == "corrupt":
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            (image_dir / f"{pid}.jpg").write_bytes(buffer.getvalue()[:120])
        else:
            image.save(image_dir / f"{pid}.jpg", quality=90)

    images_json = []
    for pid in photo_ids:
        colour, shape, size, _ = looks[pid]
        images_json.append({
            "datetaken": f"2011-0{1 + rng.randrange(9)}-1{rng.randrange(10)} 12:00:00", "license": "5",
            "title": f"{colour} {shape}", "text": "", "album_id": album_of[pid], "longitude": "0", "latitude": "0",
            "url_o": f"https://farm1.staticflickr.com/1/{pid}_synthetic_o.jpg", "secret": f"{rng.randrange(16 ** 10):010x}",
            "media": "photo", "id": pid, "tags": f"{colour} {shape} {size}"})
    albums_json = [{"description": "synthetic shapes", "title": f"album {a}", "farm": "1", "date_update": "1300000000",
                    "primary": album_photos[a][0], "server": "1", "date_create": "1300000000",
                    "photos": str(len(album_photos[a])), "secret": f"{rng.randrange(16 ** 10):010x}",
                    "owner": "00000000@N00", "vist_label": "shapes", "id": album_id}
                   for a, album_id in enumerate(album_ids)]

    annotations = []
    storylet = 200000
    for i, sid in enumerate(story_ids):
        entries = []
        for k, pid in enumerate(stories[sid]):
            entries.append([{"original_text": originals[sid][k], "album_id": album_of[pid], "photo_flickr_id": pid,
                             "setting": "first-2-pick-and-tell", "worker_id": f"WORKER{i:04d}",
                             "story_id": sid, "tier": "story-in-sequence", "worker_arranged_photo_order": k,
                             "text": captions[sid][k], "storylet_id": str(storylet + k)}])
        storylet += 5
        if shuffled:
            order = list(range(5))
            while order == sorted(order):
                rng.shuffle(order)
            entries = [entries[k] for k in order]
        annotations += entries

    document = {"info": {"description": "synthetic VIST SIS val set (fromage-bench)", "version": "1"},
                "type": "story_in_sequence", "albums": albums_json, "images": images_json, "annotations": annotations}
    json_path.write_text(json.dumps(document, indent=1))

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
