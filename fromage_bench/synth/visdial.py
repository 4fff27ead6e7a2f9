"""A small VisDial v1.0 val set in the real file formats and layout, over images of coloured shapes.

Layout under `root` (the harness's --data-root):

    visdial/visdial_1.0_val.json                    {"version", "split", "data": {questions, answers, dialogs}}
    visdial/visdial_1.0_val_dense_annotations.json  [{"image_id", "round_id" (1-based), "gt_relevance": [100]}]
    visdial/VisualDialog_val2018/VisualDialog_val2018_{image_id:012d}.jpg

Every dialogue has 10 rounds of questions about its picture; each round has 100 answer options (the
ground-truth answer at `gt_index` plus 99 other answers of the set); one round per dialogue carries dense
relevance scores. The images are JPEGs of several sizes and aspect ratios (about one in three awkward:
greyscale, CMYK, 20x15, 3000x2000, a panorama) with the scene in the centre square, written by the shared
writers (`formats`, `images`). Faults can be planted by dialogue index: `missing` (no image file written),
`corrupt` (a truncated JPEG), `png` (the image saved as .png, palette / RGBA / RGB, instead of .jpg).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageDraw

from . import formats, images

N_OPTIONS = 100
DIALOGS_FILE = "visdial/visdial_1.0_val.json"
DENSE_FILE = "visdial/visdial_1.0_val_dense_annotations.json"
IMAGE_DIR = "visdial/VisualDialog_val2018"

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30), "black": (20, 20, 20), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = ("on the left", "on the right", "at the top", "at the bottom")
BACKGROUNDS = {"grey": (128, 128, 128), "white": (250, 250, 250), "black": (20, 20, 20), "pink": (240, 180, 200)}


image_name = formats.visdial_image_name


def _answer_pool() -> list[str]:
    """Every answer text the set uses (more than 100, so each round gets 100 distinct options)."""
    pool = ["yes", "no", "i can't tell", "not that i can see", "yes, it is", "no, it is not"]
    pool += [str(n) for n in range(0, 10)]
    pool += [f"it is {c}" for c in COLOURS] + [f"it is {b}" for b in BACKGROUNDS if b not in COLOURS]
    pool += [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    pool += [f"it is {p}" for p in PLACES]
    pool += [f"{n} shapes" for n in range(1, 10)]
    pool += [f"the {s} is {c}" for c in COLOURS for s in SHAPES]
    pool += ["maybe", "i think so", "i don't think so", "it looks like it"]
    return list(dict.fromkeys(pool))


BOXES = {"on the left": (8, 30, 40, 62), "on the right": (56, 30, 88, 62),  # on a 96-pixel square
         "at the top": (32, 6, 64, 38), "at the bottom": (32, 56, 64, 88)}


def _draw(shapes: list[tuple[str, str, str]], background: str, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for colour, shape, place in shapes:
        x0, y0, x1, y1 = (round(v * size / 96) for v in BOXES[place])
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, (y0 + y1) // 2), ((x0 + x1) // 2, y1), (x0, (y0 + y1) // 2)],
                         fill=fill)
    return image


def _scene(rng: random.Random) -> tuple[list[tuple[str, str, str]], str]:
    n = rng.randint(1, 3)
    places = rng.sample(PLACES, n)
    colours = [c for c in COLOURS]
    shapes = [(rng.choice(colours), rng.choice(SHAPES), place) for place in places]
    background = rng.choice([b for b in BACKGROUNDS if all(BACKGROUNDS[b] != COLOURS[c] for c, _, _ in shapes)])
    return shapes, background


def _qa(shapes: list[tuple[str, str, str]], background: str, rng: random.Random, n_rounds: int) -> list[tuple[str, str]]:
    """Question/answer pairs about the scene (VisDial style: lower case, no '?' on questions)."""
    colour, shape, place = shapes[0]
    absent_shape = next(s for s in SHAPES if all(s != sh for _, sh, _ in shapes))
    candidates = [
        ("how many shapes are there", str(len(shapes))),
        (f"what colour is the {shape}", f"it is {colour}"),
        (f"where is the {shape}", f"it is {place}"),
        ("what colour is the background", f"it is {background}"),
        (f"is there a {absent_shape}", "no"),
        (f"is there a {shape}", "yes"),
        (f"is the {shape} {colour}", "yes, it is"),
        ("what is in the picture", f"a {colour} {shape}"),
        ("are there any people", "no"),
        ("is it a photo", "i can't tell"),
        (f"is the {shape} {'red' if colour != 'red' else 'blue'}", "no, it is not"),
        ("can you see any animals", "not that i can see"),
    ]
    for c, s, p in shapes[1:]:
        candidates += [(f"what colour is the {s} {p}", f"it is {c}"), (f"what is {p}", f"a {c} {s}")]
    picked = rng.sample(candidates, min(n_rounds, len(candidates)))
    while len(picked) < n_rounds:
        picked.append(rng.choice(candidates))
    return picked


def _write_image(path: Path, shapes: list[tuple[str, str, str]], background: str, look: images.ImageLook,
                 fault: str | None, png_faults: list) -> Path | None:
    """The scene in the centre square of `look`'s canvas; the `png` fault writes a .png (k-th: palette, RGBA,
    RGB), `corrupt` keeps the first third of the JPEG, `missing` writes nothing."""
    if fault == "png":
        look, fault = images.png_fault_look(look, len(png_faults)), None
        png_faults.append(path)
    picture = images.compose(look, BACKGROUNDS[background], lambda side: _draw(shapes, background, side),
                             random.Random(path.name))
    return images.save_image(picture, path, look, fault, keep=1 / 3)


def write_visdial(root: Path, *, n: int = 4, seed: int = 0, n_rounds: int = 10, missing: Iterable[int] = (),
                  corrupt: Iterable[int] = (), png: Iterable[int] = ()) -> dict:
    """Write `n` dialogues (10 rounds, 100 options each) with their images and dense annotations.

    Returns the paths written ("dialogs", "dense", "images"), the dialogues' "image_ids" in file order,
    the "image_paths" (as written, None where `missing`) and the dense "round_ids".
    """
    if n_rounds < 1 or n_rounds > 10:
        raise ValueError("n_rounds must be in 1..10 (VisDial val has 10)")
    root = Path(root)
    rng = random.Random(seed)
    missing, corrupt, png = set(missing), set(corrupt), set(png)
    image_dir = root / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)

    answers = _answer_pool()
    looks = images.fixture_looks(f"visdial:{seed}", n)
    dialogues, image_ids, image_paths, round_ids, png_faults = [], [], [], [], []
    for d in range(n):
        image_id = 185000 + 37 * d + rng.randint(0, 30)
        shapes, background = _scene(rng)
        described = " and ".join(f"a {c} {s} {p}" for c, s, p in shapes)
        caption = f"{described} on a {background} background"
        rounds = []
        for question, answer in _qa(shapes, background, rng, n_rounds):
            gt = answers.index(answer)
            others = rng.sample([i for i in range(len(answers)) if i != gt], N_OPTIONS - 1)
            gt_index = rng.randrange(N_OPTIONS)
            options = [answers[i] for i in others[:gt_index] + [gt] + others[gt_index:]]
            rounds.append(formats.VisdialRound(question, answer, tuple(options), gt_index))

        round_id = rng.randint(1, n_rounds)
        relevance = [0.0] * N_OPTIONS
        relevance[rounds[round_id - 1].gt_index] = 1.0
        for j in rng.sample(range(N_OPTIONS), 6):
            if j != rounds[round_id - 1].gt_index:
                relevance[j] = rng.choice([0.2, 0.4, 0.6, 0.8])
        dialogues.append(formats.VisdialDialogue(image_id, caption, tuple(rounds), round_id, tuple(relevance)))
        round_ids.append(round_id)
        image_ids.append(image_id)
        image_paths.append(_write_image(image_dir / image_name(image_id), shapes, background, looks[d],
                                        "missing" if d in missing else "corrupt" if d in corrupt else
                                        "png" if d in png else None, png_faults))

    dialogs_path, dense_path = formats.write_visdial_val(root / DIALOGS_FILE, root / DENSE_FILE, answers, dialogues)
    return {"dialogs": dialogs_path, "dense": dense_path, "images": image_dir, "image_ids": image_ids,
            "image_paths": image_paths, "round_ids": round_ids}
