"""The offline miniworld (`data synth`) and the stand-in backbones (`make-standins`)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from fromage_bench import miniworld as mw
from fromage_bench.data_cli import main as data_main


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("miniworld") / "data"
    assert data_main(["data", "synth", "--out", str(root), "--seed", "3", "--scale", "tiny"]) == 0
    return root


def _scenes(root: Path) -> dict[str, list[mw.Obj]]:
    manifest = json.loads((root / mw.MANIFEST).read_text())
    return {path: [mw.Obj(*o) for o in objs] for path, objs in manifest["scenes"].items()}


def _cell_colour_count(image: Image.Image, position: str, colour: str) -> int:
    gx, gy = mw.GRID[position]
    cell = image.crop((gx * mw.CELL, gy * mw.CELL, (gx + 1) * mw.CELL, (gy + 1) * mw.CELL))
    return sum(1 for px in cell.getdata() if px == mw.COLOURS[colour])


def _occupied_cells(image: Image.Image) -> list[str]:
    out = []
    for position, (gx, gy) in mw.GRID.items():
        cell = image.crop((gx * mw.CELL, gy * mw.CELL, (gx + 1) * mw.CELL, (gy + 1) * mw.CELL))
        if any(px != mw.BACKGROUND for px in cell.getdata()):
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
    assert len(stories) == counts["stories"] and len(pool_candidates(stories, listed)) == 5 * counts["stories"]
    assert all((world / mw.VIST_IMAGES / f"{pid}.png").is_file() for s in stories for pid in s.photo_ids)
    dialogues = load_dialogues(world / mw.VISDIAL_JSON)
    assert len(dialogues) == counts["dialogues"]
    for d in dialogues:
        assert len(d.rounds) == 10
        assert (world / mw.VISDIAL_IMAGES / f"VisualDialog_val2018_{d.image_id:012d}.png").is_file()
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
    assert all((world / mw.VIST_TRAIN_IMAGES / f"{pid}.png").is_file() for s in train_stories for pid in s.photo_ids)
    assert not {s.captions for s in train_stories} & {s.captions for s in stories}
    assert not {p for s in train_stories for p in s.photo_ids} & {p for s in stories for p in s.photo_ids}
    train = (world / mw.CC3M_TRAIN_TSV).read_text().splitlines()
    assert train[0] == "caption\timage" and len(train) == counts["train"] + 1
    assert all((world / mw.CC3M_TRAIN_IMAGES / (line.split("\t")[1] + ".png")).is_file() for line in train[1:])


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


# -- text agrees with pixels ----------------------------------------------------------------------------
def test_captions_agree_with_the_drawn_objects(world):
    scenes = _scenes(world)
    rows = [line.split("\t") for line in (world / mw.CC3M_VAL_TSV).read_text().splitlines()[1:]]
    for caption, name in rows:
        rel = f"{mw.CC3M_VAL_IMAGES}/{name}.png"
        image = Image.open(world / rel).convert("RGB")
        objects = scenes[rel]
        words = re.findall(r"[a-z]+", caption)
        assert {w for w in words if w in mw.COLOURS} == {o.colour for o in objects}, caption
        singular = {**{s: s for s in mw.SHAPES}, **{mw.plural(s): s for s in mw.SHAPES}}
        assert {singular[w] for w in words if w in singular} == {o.shape for o in objects}, caption
        assert sorted(_occupied_cells(image)) == sorted(o.position for o in objects)
        for o in objects:
            assert image.getpixel(mw.probe_point(o)) == mw.COLOURS[o.colour], (caption, o)
            if "on a grey background" not in caption:
                assert mw.PLACE[o.position] in caption


def test_dialogue_answers_agree_with_the_pixels(world):
    from tasks.visdial import load_dialogues

    checked = 0
    for d in load_dialogues(world / mw.VISDIAL_JSON):
        image = Image.open(world / mw.VISDIAL_IMAGES / f"VisualDialog_val2018_{d.image_id:012d}.png").convert("RGB")
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
    for story, image_dir in stories:
        images = [Image.open(world / image_dir / f"{pid}.png").convert("RGB") for pid in story.photo_ids]
        assert all(list(a.getdata()) != list(b.getdata()) for a, b in zip(images, images[1:]))
        for text, image in zip(story.captions, images):
            colour = re.search(r"turned (\w+)", text)
            if colour:
                assert any(_cell_colour_count(image, p, colour.group(1)) > 20 for p in mw.POSITIONS), text
            moved = re.search(r"moved to the (\w+)", text)
            if moved:
                assert moved.group(1) in _occupied_cells(image), text


def test_pretraining_text_matches_the_task_prompts(world):
    docs = mw.read_lm_docs(world / mw.LM_TRAIN)
    kinds = {d["kind"] for d in docs}
    assert kinds == {"caption", "story", "dialogue"}
    ranking = [d for d in docs if d["kind"] == "dialogue" and len(d["segments"]) == 2]
    assert ranking and all(d["segments"][0].endswith("\nA: ") for d in ranking)
    held = mw.read_lm_docs(world / mw.LM_HELDOUT)
    val_captions = [line.split("\t")[0] for line in (world / mw.CC3M_VAL_TSV).read_text().splitlines()[1:]]
    assert [d["segments"][0] for d in held if d["kind"] == "caption"] == val_captions
    assert not set(val_captions) & {d["segments"][0] for d in docs if d["kind"] == "caption"} - {
        line.split("\t")[0] for line in (world / mw.CC3M_TRAIN_TSV).read_text().splitlines()[1:]}


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
