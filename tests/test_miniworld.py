"""The offline miniworld (`data synth`) and the stand-in backbones (`make-standins`)."""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from fromage_bench import miniworld as mw
from fromage_bench.data_cli import main as data_main
from model.datasets import read_cc3m_rows


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("miniworld") / "data"
    assert data_main(["data", "synth", "--out", str(root), "--seed", "3", "--scale", "tiny"]) == 0
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / mw.MANIFEST).read_text())


def _scenes(root: Path) -> dict[str, list[mw.Obj]]:
    return {path: [mw.Obj(*o) for o in objs] for path, objs in _manifest(root)["scenes"].items()}


def _file(scenes: dict, image_dir: str, name: str) -> str:
    """The written file (relative path) of a TSV image name, which may lack its extension."""
    for rel in (f"{image_dir}/{name}", f"{image_dir}/{name}.jpg", f"{image_dir}/{name}.png"):
        if rel in scenes:
            return rel
    raise AssertionError(f"no file for {name!r}")


TOLERANCE = 40  # JPEG (quality 90) moves the drawn pixels' channels by up to about 25 here
SHOWS_COLOURS = 48  # greyscale files and scenes drawn smaller than this cannot show what the texts say


def _scene_square(root: Path, rel: str) -> Image.Image | None:
    """The centre square holding the scene, on the 96-pixel grid (nearest neighbour), or None for a file
    that cannot show the colours (greyscale, or too small)."""
    look = _manifest_looks(root)[rel]
    x0, y0, side = look["content_box"]
    if look["mode"] == "L" or side < SHOWS_COLOURS:
        return None
    with Image.open(root / rel) as image:
        square = image.convert("RGB").crop((x0, y0, x0 + side, y0 + side))
    return square.resize((mw.IMAGE_SIZE, mw.IMAGE_SIZE), Image.Resampling.NEAREST)


@functools.cache
def _manifest_looks(root: Path) -> dict:
    return _manifest(root)["looks"]


def _close(px, colour, tolerance: int = TOLERANCE) -> bool:
    return max(abs(a - b) for a, b in zip(px, colour)) <= tolerance


def _cell_colour_count(image: Image.Image, position: str, colour: str) -> int:
    gx, gy = mw.GRID[position]
    cell = image.crop((gx * mw.CELL, gy * mw.CELL, (gx + 1) * mw.CELL, (gy + 1) * mw.CELL))
    return sum(1 for px in cell.getdata() if _close(px, mw.COLOURS[colour]))


def _occupied_cells(image: Image.Image) -> list[str]:
    """Cells with something drawn in them: at least 10 pixels far from the background (JPEG noise is not)."""
    out = []
    for position, (gx, gy) in mw.GRID.items():
        cell = image.crop((gx * mw.CELL, gy * mw.CELL, (gx + 1) * mw.CELL, (gy + 1) * mw.CELL))
        if sum(1 for px in cell.getdata() if not _close(px, mw.BACKGROUND, 60)) >= 10:
            out.append(position)
    return out


# -- data synth -----------------------------------------------------------------------------------------
def test_synth_is_deterministic_for_a_seed(world, tmp_path):
    again = tmp_path / "again"
    mw.write_miniworld(again, seed=3, scale="tiny")
    assert _digest(again) == _digest(world)
    other = tmp_path / "other"
    mw.write_miniworld(other, seed=4, scale="tiny")
    assert _digest(other) != _digest(world)
    assert set(_digest(other)) != set() and (other / mw.CC3M_TRAIN_TSV).read_bytes() != (world / mw.CC3M_TRAIN_TSV).read_bytes()


def test_rerun_leaves_no_stale_files(tmp_path):
    mw.write_miniworld(tmp_path, seed=0, scale="tiny")
    (tmp_path / mw.CC3M_VAL_IMAGES / "stale.png").write_bytes(b"x")
    mw.write_miniworld(tmp_path, seed=0, scale="tiny")
    assert not (tmp_path / mw.CC3M_VAL_IMAGES / "stale.png").exists()


def test_the_task_loaders_read_every_dataset(world):
    from tasks.caption_data import load_cc3m, load_karpathy
    from tasks.visdial import load_dialogues
    from tasks.vist import load_stories, pool_candidates

    counts = mw.SCALES["tiny"]
    items = load_cc3m(world / mw.CC3M_VAL_TSV, world / mw.CC3M_VAL_IMAGES)
    assert len(items) == counts["val"] and all(it.path.is_file() and len(it.captions) == 1 for it in items)
    coco = load_karpathy(world / mw.COCO_JSON, world / "coco")
    assert len(coco) == counts["coco"] and all(it.path.is_file() and len(it.captions) == 5 for it in coco)
    stories, listed = load_stories(world / mw.VIST_JSON)
    # albums are shared: a story starts from its album's first photo and may share later ones with album-mates
    albums = -(-counts["stories"] // mw.STORIES_PER_ALBUM)
    assert len(stories) == counts["stories"]
    assert albums < len(pool_candidates(stories, listed)) <= albums + 4 * counts["stories"]
    scenes = _scenes(world)
    assert all(_file(scenes, mw.VIST_IMAGES, pid) for s in stories for pid in s.photo_ids)
    dialogues = load_dialogues(world / mw.VISDIAL_JSON)
    assert len(dialogues) == counts["dialogues"]
    for d in dialogues:
        assert len(d.rounds) == 10
        assert (world / mw.VISDIAL_IMAGES / f"VisualDialog_val2018_{d.image_id:012d}.jpg").is_file()
        for r in d.rounds:
            assert len(set(r.options)) == 100 and r.options[r.gt_index] == r.answer
    dense = json.loads((world / mw.VISDIAL_DENSE).read_text())
    for d, a in zip(dialogues, dense):
        rnd = d.rounds[a["round_id"] - 1]
        assert a["image_id"] == d.image_id and a["gt_relevance"][rnd.gt_index] == 1.0
        for option, rel in zip(rnd.options, a["gt_relevance"]):  # equivalent phrasings: 0.5, others 0
            same = mw.MEANING_OF[option] == mw.MEANING_OF[rnd.answer]
            assert rel == (1.0 if option == rnd.answer else 0.5 if same else 0.0)
    train_stories, _ = load_stories(world / mw.VIST_TRAIN_JSON)  # the training stories: other photos, other stories
    assert len(train_stories) == counts["train_stories"]
    assert all(_file(scenes, mw.VIST_TRAIN_IMAGES, pid) for s in train_stories for pid in s.photo_ids)
    assert not {s.captions for s in train_stories} & {s.captions for s in stories}
    assert not {p for s in train_stories for p in s.photo_ids} & {p for s in stories for p in s.photo_ids}
    assert (world / mw.CC3M_TRAIN_TSV).read_text().startswith("caption\timage\n")
    train = read_cc3m_rows(world / mw.CC3M_TRAIN_TSV)  # a chat request spans two lines: read as pandas reads it
    assert len(train) == counts["train"]
    assert all((world / _file(scenes, mw.CC3M_TRAIN_IMAGES, row.image)).is_file() for row in train)


def test_the_clip_pretraining_split_is_plain_captions_and_leaves_every_other_file_as_it_was(world, tmp_path):
    """The stand-in CLIP's own pairs: captions of their scenes (no story, dialogue or chat request: CLIP's web
    pairs hold none), written after everything else so that the datasets FROMAGe reads did not change."""
    from fromage_bench.standins import clip_pretraining_files

    scenes = _scenes(world)
    rows = read_cc3m_rows(world / mw.CLIP_TRAIN_TSV)
    assert len(rows) == mw.SCALES["tiny"]["clip_train"]
    for row in rows:
        objects = scenes[_file(scenes, mw.CLIP_TRAIN_IMAGES, row.image)]
        assert not row.caption.startswith(("Q:", "we saw")) and "\n" not in row.caption
        assert all(o.shape in row.caption and o.colour in row.caption for o in objects), (row.caption, objects)
    assert clip_pretraining_files(world) == (world / mw.CLIP_TRAIN_TSV, world / mw.CLIP_TRAIN_IMAGES)
    assert clip_pretraining_files(tmp_path) == (tmp_path / mw.CC3M_TRAIN_TSV, tmp_path / mw.CC3M_TRAIN_IMAGES)

    without = tmp_path / "without"
    mw.write_miniworld(without, seed=3, scale="tiny", clip_train=0)
    before, after = _digest(without), _digest(world)
    others = [rel for rel in after if not rel.startswith(("clip/", mw.MANIFEST))]
    assert others and {rel: after[rel] for rel in others} == {rel: before.get(rel) for rel in others}


def test_eval_runs_every_task_on_the_miniworld(world, tiny_dir, tmp_path):
    from fromage_bench.cli import main

    out = tmp_path / "run"
    code = main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(world), "--tasks",
                 "vist_retrieval,visdial_retrieval,visdial_ranking,image_text_retrieval,captioning",
                 "--limit", "2", "--no-cache", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    records = json.loads((out / "results.json").read_text())["records"]
    cells = {(r["task"], r["setting"]) for r in records}
    assert cells == {("vist_retrieval", s) for s in ("1cap", "5cap", "5cap4img")} | {
        ("visdial_retrieval", "val"), ("visdial_ranking", "val")} | {
        (t, s) for t in ("image_text_retrieval", "captioning") for s in ("cc3m", "coco")}
    for r in records:
        assert r["status"] == "ok", r
        assert r["metrics"] and r["n_examples"] > 0, r


# -- files like a real collection ----------------------------------------------------------------------
def _opened(root: Path, relatives) -> list[dict]:
    """What PIL reads from each file (not what the manifest says)."""
    out = []
    for rel in relatives:
        with Image.open(root / rel) as image:
            out.append({"rel": rel, "format": image.format, "mode": image.mode, "size": image.size})
    return out


def test_the_collection_has_the_mix_of_real_photos(world):
    looks = _manifest_looks(world)
    files = _opened(world, sorted(looks))
    assert len(files) == _manifest(world)["counts"]["images"]
    formats = collections.Counter(f["format"] for f in files)
    assert formats["JPEG"] > 0.75 * len(files) and formats["PNG"] > 0.05 * len(files), formats
    modes = collections.Counter((f["format"], f["mode"]) for f in files)
    for odd in (("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "P")):
        assert 1 <= modes[odd] <= 0.1 * len(files), (odd, modes)
    ratios = collections.Counter(round(w / h, 1) for f in files for w, h in [f["size"]])
    for ratio in (1.3, 0.8, 1.8):  # 4:3, 3:4, 16:9 (one of 3:4 rounds to 0.8)
        assert ratios[ratio] >= 0.1 * len(files), ratios
    assert 1 <= ratios[3.0] + ratios[0.3] <= 0.15 * len(files), ratios  # panoramas, either way up
    large = [f for f in files if max(f["size"]) >= 2000]
    tiny = [f for f in files if max(f["size"]) <= 20]
    assert large and tiny and len(large) + len(tiny) <= 0.08 * len(files)
    assert all(max(f["size"]) <= 3000 and f["size"][0] * f["size"][1] <= 3000 * 2000 for f in large)
    for f in files:  # the suffix says the format; the manifest agrees with the file
        assert Path(f["rel"]).suffix == {"JPEG": ".jpg", "PNG": ".png"}[f["format"]], f
        look = looks[f["rel"]]
        assert (look["format"], look["mode"], tuple(look["size"])) == (f["format"], f["mode"], f["size"])
    for folder in (mw.VISDIAL_IMAGES, "coco/"):  # released as .jpg files
        assert all(f["format"] == "JPEG" for f in files if f["rel"].startswith(folder))


def test_centre_crop_keeps_the_scene_and_squash_shows_the_margins(world):
    """A centre crop of a wide or tall file is the scene square; squashing it also shows margin clutter."""
    looks = _manifest_looks(world)
    scenes = _scenes(world)
    checked = 0
    for rel, look in looks.items():
        x0, y0, side = look["content_box"]
        width, height = look["size"]
        if width == height or look["mode"] == "L" or side < SHOWS_COLOURS:
            continue
        with Image.open(world / rel) as image:
            rgb = image.convert("RGB")
        assert (x0, y0) == ((width - side) // 2, (height - side) // 2)  # the centre square
        margin = rgb.crop((0, 0, x0, height) if x0 else (0, 0, width, y0))
        assert sum(1 for px in margin.getdata() if not _close(px, mw.BACKGROUND, 30)) > 0, rel  # clutter
        square = _scene_square(world, rel)
        assert sorted(_occupied_cells(square)) == sorted(o.position for o in scenes[rel]), rel
        crop = rgb.crop((x0, y0, x0 + side, y0 + side)).resize((64, 64))
        squash = rgb.resize((64, 64))
        assert list(crop.getdata()) != list(squash.getdata())
        checked += 1
    assert checked >= len(looks) // 2


def test_the_tsvs_are_pandas_files_naming_most_images_with_their_extension(world):
    import pandas as pd

    scenes = _scenes(world)
    for tsv, image_dir in ((mw.CC3M_VAL_TSV, mw.CC3M_VAL_IMAGES), (mw.CC3M_TRAIN_TSV, mw.CC3M_TRAIN_IMAGES)):
        frame = pd.read_csv(world / tsv, sep="\t", dtype=str, keep_default_na=False)
        assert list(frame.columns) == ["caption", "image"]
        with_ext = [name for name in frame["image"] if Path(name).suffix in (".jpg", ".png")]
        assert 0.6 * len(frame) <= len(with_ext) < len(frame), tsv  # a mix: most with, some without
        assert all(_file(scenes, image_dir, name) for name in frame["image"])
    held = [d["segments"][0] for d in mw.read_lm_docs(world / mw.LM_HELDOUT) if d["kind"] == "caption"]
    assert pd.read_csv(world / mw.CC3M_VAL_TSV, sep="\t", dtype=str)["caption"].tolist() == held


def test_the_miniworld_and_the_fixtures_share_the_writers(tmp_path, monkeypatch):
    """Each format has one writer: the miniworld and the fixture builders both call it, and the task loaders
    read both outputs."""
    from fromage_bench.synth import captions, formats, images, visdial, vist
    from tasks.caption_data import load_cc3m, load_karpathy
    from tasks.visdial import load_dialogues
    from tasks.vist import load_stories

    calls = collections.Counter()
    for name in ("write_cc3m_tsv", "write_coco_karpathy_json", "write_vist_sis", "write_visdial_val"):
        original = getattr(formats, name)
        monkeypatch.setattr(formats, name, lambda *a, _f=original, _n=name, **k: (calls.update([_n]), _f(*a, **k))[1])
    original_save = images.save_image
    monkeypatch.setattr(images, "save_image", lambda *a, **k: (calls.update(["save_image"]), original_save(*a, **k))[1])

    small = dict(clip_train=2, train=4, val=3, coco=2, coco_other=1, stories=1, train_stories=1, dialogues=2,
                 lm_stories=1, lm_dialogues=1)
    mw.write_miniworld(tmp_path / "mini", seed=0, scale="tiny", **small)
    from_miniworld = dict(calls)
    assert from_miniworld == {"write_cc3m_tsv": 3, "write_coco_karpathy_json": 1, "write_vist_sis": 2,
                              "write_visdial_val": 1, "save_image": 2 + 4 + 3 + 3 + 5 + 5 + 2}
    calls.clear()
    fixtures = tmp_path / "fixtures"
    cc3m = captions.write_cc3m(fixtures, n=3)
    coco = captions.write_coco_karpathy(fixtures, n=2, n_other=1)
    story = vist.write_vist(fixtures, n=2)
    dialog = visdial.write_visdial(fixtures, n=2)
    assert {k: v for k, v in calls.items() if k != "save_image"} == {
        "write_cc3m_tsv": 1, "write_coco_karpathy_json": 1, "write_vist_sis": 1, "write_visdial_val": 1}
    assert calls["save_image"] == 3 + 3 + len(story["pool"]) + len(story["unused"]) + 2

    mini = tmp_path / "mini"
    for tsv, image_dir in ((mini / mw.CC3M_VAL_TSV, mini / mw.CC3M_VAL_IMAGES), (cc3m["tsv"], cc3m["image_dir"])):
        assert all(item.path.is_file() for item in load_cc3m(tsv, image_dir))
    for path, image_root in ((mini / mw.COCO_JSON, mini / "coco"), (coco["json"], coco["image_root"])):
        assert all(item.path.suffix == ".jpg" and item.path.is_file() for item in load_karpathy(path, image_root))
    for path in (mini / mw.VIST_JSON, story["json"]):
        stories, _ = load_stories(path)
        assert stories and all(len(s.photo_ids) == 5 for s in stories)
    for path in (mini / mw.VISDIAL_JSON, dialog["dialogs"]):
        assert all(len(r.options) == 100 for d in load_dialogues(path) for r in d.rounds)
    # the same keys in both: the layout comes from one place
    keys = [set(json.loads(Path(p).read_text())["images"][0]) for p in (mini / mw.VIST_JSON, story["json"])]
    assert keys[0] == keys[1]
    keys = [set(json.loads(Path(p).read_text())["images"][0]) for p in (mini / mw.COCO_JSON, coco["json"])]
    assert keys[0] == keys[1]


def test_fixtures_are_deterministic_and_awkward(tmp_path):
    from fromage_bench.synth.captions import write_cc3m, write_coco_karpathy
    from fromage_bench.synth.visdial import write_visdial
    from fromage_bench.synth.vist import write_vist

    def build(root: Path, seed: int) -> dict[str, str]:
        write_cc3m(root, n=6, seed=seed, png=1, corrupt=1)
        write_coco_karpathy(root, n=4, seed=seed)
        write_vist(root, n=2, seed=seed)
        write_visdial(root, n=3, seed=seed, png=[0])
        return _digest(root)

    first = build(tmp_path / "a", 5)
    assert build(tmp_path / "b", 5) == first  # same bytes, file for file
    assert build(tmp_path / "c", 6) != first
    files = _opened(tmp_path / "a", [rel for rel in first if not rel.endswith((".tsv", ".json"))
                                    and "cc3m" not in rel])  # (cc3m holds a truncated file)
    assert {"L", "CMYK"} & {f["mode"] for f in files} and any(f["size"][0] != f["size"][1] for f in files)
    assert any(f["format"] == "PNG" for f in files)


def test_opt_in_awkward_captions_are_written_quoted_by_pandas(tmp_path):
    import pandas as pd

    from fromage_bench.synth.captions import write_cc3m

    info = write_cc3m(tmp_path, n=5, seed=1, awkward_captions=2)
    awkward = [c for c in info["captions"] if '"' in c or "\t" in c]
    assert len(awkward) == 2
    raw = info["tsv"].read_text()
    assert all(f'"{c.replace(chr(34), 2 * chr(34))}"' in raw for c in awkward)  # quoted, inner quotes doubled
    frame = pd.read_csv(info["tsv"], sep="\t", dtype=str, keep_default_na=False)
    assert frame["caption"].tolist() == info["captions"] and frame["image"].tolist() == info["ids"]
    assert not any('"' in c or "\t" in c for c in write_cc3m(tmp_path / "plain", n=5, seed=1)["captions"])


def test_the_image_writer(tmp_path):
    import random

    from fromage_bench.synth import images

    rng_a, rng_b = random.Random("x"), random.Random("x")
    assert [images.choose_look(rng_a) for _ in range(50)] == [images.choose_look(rng_b) for _ in range(50)]
    look = images.ImageLook(160, 90, "JPEG", "CMYK")
    assert look.content_box == (35, 0, 90)
    paint = lambda side: Image.new("RGB", (side, side), (220, 30, 30))  # noqa: E731
    picture = images.compose(look, (150, 150, 150), paint, random.Random(0))
    assert picture.size == (160, 90) and picture.getpixel((80, 45)) == (220, 30, 30)
    written = images.save_image(picture, tmp_path / "a.png", look)  # the look decides the suffix
    assert written == tmp_path / "a.jpg"
    with Image.open(written) as back:
        assert (back.format, back.mode, back.size) == ("JPEG", "CMYK", (160, 90))
        assert _close(back.convert("RGB").getpixel((80, 45)), (220, 30, 30))
    assert images.save_image(picture, tmp_path / "b.jpg", look, "missing") is None and not (tmp_path / "b.jpg").exists()
    truncated = images.save_image(picture, tmp_path / "c.jpg", look, "corrupt")
    assert truncated.stat().st_size == len(images.encode(picture, look)) // 2
    with pytest.raises(ValueError, match=r"paint\(90\)"):
        images.compose(look, (0, 0, 0), lambda side: Image.new("RGB", (10, 10)), random.Random(0))


# -- text agrees with pixels ----------------------------------------------------------------------------
def test_captions_agree_with_the_drawn_objects(world):
    scenes = _scenes(world)
    rows = [line.split("\t") for line in (world / mw.CC3M_VAL_TSV).read_text().splitlines()[1:]]
    checked = 0
    for caption, name in rows:
        rel = _file(scenes, mw.CC3M_VAL_IMAGES, name)
        image = _scene_square(world, rel)
        objects = scenes[rel]
        words = re.findall(r"[a-z]+", caption)
        assert {w for w in words if w in mw.COLOURS} == {o.colour for o in objects}, caption
        singular = {**{s: s for s in mw.SHAPES}, **{mw.plural(s): s for s in mw.SHAPES}}
        assert {singular[w] for w in words if w in singular} == {o.shape for o in objects}, caption
        for o in objects:
            if "on a grey background" not in caption:
                assert mw.PLACE[o.position] in caption
        if image is None:  # greyscale or tiny: the text still describes the scene, the pixels cannot show it
            continue
        assert sorted(_occupied_cells(image)) == sorted(o.position for o in objects)
        x0, y0, side = _manifest_looks(world)[rel]["content_box"]
        with Image.open(world / rel) as full:
            full = full.convert("RGB")
        for o in objects:  # at the file's own scale: the probe pixel of the scaled drawing
            px, py = mw.probe_point(o, side)
            assert _close(full.getpixel((x0 + px, y0 + py)), mw.COLOURS[o.colour]), (caption, o, rel)
        checked += 1
    assert checked >= len(rows) // 2


def test_dialogue_answers_agree_with_the_pixels(world):
    from tasks.visdial import load_dialogues

    checked = 0
    for d in load_dialogues(world / mw.VISDIAL_JSON):
        image = _scene_square(world, f"{mw.VISDIAL_IMAGES}/VisualDialog_val2018_{d.image_id:012d}.jpg")
        if image is None:
            continue
        occupied = _occupied_cells(image)
        for r in d.rounds:
            if r.question == "how many shapes are there":
                assert mw.NUMBER_WORDS[len(occupied)] == r.answer
                checked += 1
            m = re.fullmatch(r"what colour is the shape (.+)", r.question)
            if m:
                position = next(p for p, phrase in mw.PLACE.items() if phrase == m.group(1))
                assert _cell_colour_count(image, position, r.answer) > 20, (d.image_id, r)
                checked += 1
            m = re.fullmatch(r"what is (.+)", r.question)
            if m:
                position = next(p for p, phrase in mw.PLACE.items() if phrase == m.group(1))
                if r.answer == "nothing":
                    assert position not in occupied
                else:
                    colour = r.answer.split()[1]
                    assert _cell_colour_count(image, position, colour) > 20, (d.image_id, r)
                checked += 1
            m = re.fullmatch(r"what colour is the (\w+)", r.question)
            if m and m.group(1) in mw.SHAPES:
                colour = r.answer.removeprefix("it is ")
                assert any(_cell_colour_count(image, p, colour) > 20 for p in occupied), (d.image_id, r)
                checked += 1
    assert checked > 0


def test_stories_follow_their_sentences(world):
    from tasks.vist import load_stories

    stories = [(s, mw.VIST_IMAGES) for s in load_stories(world / mw.VIST_JSON)[0]]
    stories += [(s, mw.VIST_TRAIN_IMAGES) for s in load_stories(world / mw.VIST_TRAIN_JSON)[0]]
    scenes = _scenes(world)
    for story, image_dir in stories:
        files = [_file(scenes, image_dir, pid) for pid in story.photo_ids]
        assert all(scenes[a] != scenes[b] for a, b in zip(files, files[1:]))  # every step changes the scene
        for text, rel in zip(story.captions, files):
            image = _scene_square(world, rel)
            if image is None:
                continue
            colour = re.search(r"turned (\w+)", text)
            if colour:
                assert any(_cell_colour_count(image, p, colour.group(1)) > 20 for p in mw.POSITIONS), text
            moved = re.search(r"moved to the (\w+)", text)
            if moved:
                assert moved.group(1) in _occupied_cells(image), text


def test_stories_share_albums_and_photos_as_in_vist(world):
    """VIST tells several stories over one album: the retrieval pool holds a story's album-mates beside its own
    photos. Read from the written JSON itself, not through our loader."""
    for split in (mw.VIST_JSON, mw.VIST_TRAIN_JSON):
        sis = json.loads((world / split).read_text(encoding="utf-8"))
        photo_album = {p["id"]: p["album_id"] for p in sis["images"]}
        stories: dict[str, list] = {}
        for (entry,) in sis["annotations"]:
            stories.setdefault(entry["story_id"], []).append(entry)
        albums: dict[str, list[list[str]]] = {}
        for entries in stories.values():
            photos = [e["photo_flickr_id"] for e in sorted(entries, key=lambda e: e["worker_arranged_photo_order"])]
            assert len(set(photos)) == 5  # a story never shows one photo twice (its target is never its context)
            (album,) = {e["album_id"] for e in entries} | {photo_album[p] for p in photos}
            albums.setdefault(album, []).append(photos)
        assert all(len(told) > 1 for told in albums.values()), split
        assert max(len(told) for told in albums.values()) <= mw.STORIES_PER_ALBUM
        for told in albums.values():
            assert len({story[0] for story in told}) == 1  # an album's stories start from the same photo
            targets = {story[-1] for story in told}
            others = {p for story in told for p in story} - targets
            assert others - set(told[0]), "the pool holds album photos that are not a story's own"
        # every photo file listed is used by a story, and each only once per album in the image list
        used = {p for told in albums.values() for story in told for p in story}
        assert used == set(photo_album) and len(sis["images"]) == len(photo_album)


def test_pretraining_text_matches_the_task_prompts(world):
    docs = mw.read_lm_docs(world / mw.LM_TRAIN)
    kinds = {d["kind"] for d in docs}
    assert kinds == {"caption", "story", "dialogue"}
    ranking = [d for d in docs if d["kind"] == "dialogue" and len(d["segments"]) == 2]
    assert ranking and all(d["segments"][0].endswith("\nA: ") for d in ranking)
    held = mw.read_lm_docs(world / mw.LM_HELDOUT)
    val_captions = [row.caption for row in read_cc3m_rows(world / mw.CC3M_VAL_TSV)]
    assert [d["segments"][0] for d in held if d["kind"] == "caption"] == val_captions
    assert not set(val_captions) & {d["segments"][0] for d in docs if d["kind"] == "caption"} - {
        row.caption for row in read_cc3m_rows(world / mw.CC3M_TRAIN_TSV)}


def test_variants_are_hard_negatives():
    import random

    from fromage_bench.standins import hard_negative_pairs

    rng = random.Random(0)
    for _ in range(300):
        scene = mw.random_scene(rng)
        other = mw.variant(scene, rng)
        assert mw.scene_key(other) != mw.scene_key(scene) and len(other) == len(scene)
        assert sorted(o.shape for o in other) == sorted(o.shape for o in scene)
        assert sorted(o.colour for o in other) == sorted(o.colour for o in scene)
        assert len({o.position for o in other}) == len(other)
    pairs = hard_negative_pairs(20, seed=0)
    assert len(pairs) == 40
    for (image_a, text_a), (image_b, text_b) in zip(pairs[::2], pairs[1::2]):
        assert text_a != text_b and list(image_a.getdata()) != list(image_b.getdata())
        assert sorted(re.findall(r"[a-z]+", text_a)) != sorted(re.findall(r"[a-z]+", text_b)) or "and" in text_a


# -- stand-ins ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def standins(world, tmp_path_factory):
    from fromage_bench.standins import make_standins

    out = tmp_path_factory.mktemp("standins") / "out"
    report = make_standins(world, out, seed=0, preset="tiny", lm_steps=40, vision_steps=40)
    return out, report


def test_standin_pretraining_lowers_both_losses(standins):
    out, report = standins
    assert report["lm"]["final_loss"] < report["lm"]["first_loss"] - 1.0
    assert report["vision"]["final_loss"] < report["vision"]["first_loss"]
    assert report["lm"]["heldout_perplexity"] < report["lm"]["unigram_perplexity"]
    saved = json.loads((out / "standins.json").read_text())
    assert saved["lm"]["heldout_perplexity"] == report["lm"]["heldout_perplexity"]
    assert saved["vision"]["heldout"]["chance_R@1"] > 0
    assert saved["vision"]["heldout_hard_negatives"]["chance"] == 50.0


def test_standins_have_the_real_backbones_layout(standins):
    from transformers import CLIPVisionConfig, GPT2Tokenizer, OPTConfig

    from model.backbones import load_image_processor, load_tokenizer

    out, _ = standins
    raw = GPT2Tokenizer.from_pretrained(str(out / "opt"))
    assert [raw.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert raw("a red circle").input_ids[0] == 2  # BOS </s>, as OPT
    tokenizer = load_tokenizer(out / "opt")
    assert OPTConfig.from_pretrained(str(out / "opt")).vocab_size > len(tokenizer)
    clip = CLIPVisionConfig.from_pretrained(str(out / "clip"))
    processor = load_image_processor(out / "clip")
    assert processor.crop_size["height"] == processor.crop_size["width"] == clip.image_size
    assert processor.size["shortest_edge"] == clip.image_size


def test_the_standin_clip_is_a_whole_clip_model_whose_vision_tower_fromage_uses(standins, world):
    from transformers import CLIPModel, CLIPVisionModel

    from model import load_fromage
    from model.clip_baseline import is_clip_dir, load_clip
    from model.images import pixel_values
    from model.precision import resolve_placement

    out, report = standins
    assert is_clip_dir(out / "clip")
    whole = CLIPModel.from_pretrained(str(out / "clip")).eval()
    tower = CLIPVisionModel.from_pretrained(str(out / "clip")).eval()
    assert tower.config.architectures == ["CLIPVisionModel"]  # the vision config FROMAGe's identity covers
    fromage = load_fromage(out, device="cpu", precision="fp32")
    images = [mw.render(mw.random_scene(__import__("random").Random(s))) for s in range(3)]
    pixels = pixel_values(fromage.model.feature_extractor, images)
    with torch.no_grad():  # FROMAGe's features are the whole CLIP's vision tower's, bit for bit
        assert torch.equal(fromage.model.vision_features(pixels), whole.vision_model(pixel_values=pixels).pooler_output)
        assert torch.equal(tower(pixel_values=pixels).pooler_output, whole.vision_model(pixel_values=pixels).pooler_output)
    trained = report["vision"]  # both towers trained together, on the caption-only split
    assert trained["final_loss"] < trained["first_loss"] and trained["heldout"]["n"] > 0
    assert trained["train_pairs"] == mw.SCALES["tiny"]["clip_train"] and trained["text_parameters"] > 0
    clip = load_clip(out / "clip", resolve_placement("cpu", "fp32"))
    embeddings = clip.retrieval_embeddings([["a small red circle on the left."], ["a big blue square."]])
    assert embeddings.shape == (2, whole.config.projection_dim)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2))


def test_untrained_fromage_over_the_standins_loads(standins, tmp_path):
    from model import load_fromage
    from model.images import pixel_values
    from fromage_bench.standins import write_untrained_fromage

    out, _ = standins
    next_to = load_fromage(out, device="cpu", precision="fp32")  # make_standins wrote one in OUT itself
    assert next_to.model.args.opt_version == "opt"
    elsewhere = write_untrained_fromage(tmp_path / "fromage", out, seed=1, shared_emb_dim=32)
    args = json.loads((elsewhere / "model_args.json").read_text())
    assert not Path(args["opt_version"]).is_absolute() and args["shared_emb_dim"] == 32
    fromage = load_fromage(elsewhere, device="cpu", precision="fp32")
    image = mw.render(mw.random_scene(__import__("random").Random(0)))
    feats = fromage.model.vision_features(pixel_values(fromage.model.feature_extractor, [image]))
    assert feats.shape == (1, fromage.model.visual_model.config.hidden_size) and torch.isfinite(feats).all()
    scores = fromage.get_log_lik_scores(["a small red circle on the left."])
    assert torch.isfinite(torch.as_tensor(scores)).all()


@pytest.mark.embedded
def test_small_standins_are_far_above_chance(tmp_path):
    """The `small` scale and preset end to end (a few minutes on 2 cores)."""
    from fromage_bench.standins import make_standins

    mw.write_miniworld(tmp_path / "data", seed=0, scale="small")
    report = make_standins(tmp_path / "data", tmp_path / "standins", seed=0, preset="small")
    assert report["lm"]["heldout_perplexity"] < report["lm"]["unigram_perplexity"] / 10
    held = report["vision"]["heldout"]
    assert min(held["i2t_R@1"], held["t2i_R@1"]) > 20 * held["chance_R@1"]


def test_chat_requests_are_answered_by_a_caption_of_the_picture(world):
    """The `Q: ...\\nA: caption` training pairs: the demo's turn format, a request naming an object of the
    picture (when it names one), answered by a caption naming the colour and shape of each object."""
    scenes = _scenes(world)
    requests = [row for row in read_cc3m_rows(world / mw.CC3M_TRAIN_TSV) if "\nA: " in row.caption]
    assert requests  # the tiny scale still has some
    for row in requests:
        question, answer = row.caption.split("\nA: ")
        assert question.startswith("Q: ") and answer.endswith(".")
        scene = scenes[_file(scenes, mw.CC3M_TRAIN_IMAGES, row.image)]
        for obj in scene:
            assert obj.colour in answer and (obj.shape in answer or mw.plural(obj.shape) in answer)
        if question[3:] not in {r for r in mw.REQUESTS if "{thing}" not in r}:
            assert any(f"{o.colour} {o.shape}" in question or f"{o.colour} {mw.plural(o.shape)}" in question
                       for o in scene)
