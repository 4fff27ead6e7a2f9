"""Model families behind one task interface (model/family.py): family detection, the CLIP baseline's retrieval
against a hand computation with the raw CLIPModel, its truncation, skipped cells, and the records' model entry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fromage_bench.synth.captions import write_cc3m
from fromage_bench.synth.visdial import write_visdial
from fromage_bench.synth.vist import write_vist
from model.errors import FromageInputError
from model.family import source_state
from model.images import SQUASH, CROP, open_image, prepare
from model.loading import detect_family, load_model
from model.precision import resolve_placement
from tasks import get_task
from tasks.base import RunContext
from tasks.vist import MASK_PENALTY, load_stories


def write_tiny_clip(out: Path, seed: int = 0, image_size: int = 40) -> Path:
    """A tiny CLIPModel directory (config model_type "clip", weights, tokenizer, image processor), seeded."""
    from transformers import CLIPConfig, CLIPModel, GPT2Tokenizer

    from fromage_bench.standins import image_processor
    from model.clip_baseline import stand_in_clip_tokenizer
    from model.tiny import save_trained_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    save_trained_tokenizer(out / "bpe")
    tokenizer = stand_in_clip_tokenizer(GPT2Tokenizer.from_pretrained(str(out / "bpe")))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    image_processor(image_size).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_model(clip=clip_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def raw_clip(clip_dir):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    return (CLIPModel.from_pretrained(str(clip_dir)).eval(), AutoTokenizer.from_pretrained(str(clip_dir)),
            CLIPImageProcessor.from_pretrained(str(clip_dir)))


@pytest.fixture(scope="module")
def vist(tmp_path_factory):
    return write_vist(tmp_path_factory.mktemp("vist"), n=6, seed=3, missing=1, png=1)


# -- detection ----------------------------------------------------------------------------------------------
def test_each_directory_kind_is_detected(tiny_dir, clip_dir, tmp_path):
    assert detect_family(tiny_dir) == "fromage"
    assert detect_family(clip_dir) == "clip"
    gill = tmp_path / "gill"
    gill.mkdir()
    (gill / "model_args.json").write_text(json.dumps({"opt_version": "facebook/opt-6.7b", "num_tokens": 8,
                                                      "gen_token_idx": [50266]}))
    assert detect_family(gill) == "gill"


def test_a_gill_release_without_gill_support_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    gill = tmp_path / "gill"
    gill.mkdir()
    (gill / "model_args.json").write_text(json.dumps({"num_tokens": 8}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "model.gill" else real(name, *a))
    with pytest.raises(FromageInputError, match="GILL release directory: not supported yet"):
        load_model(gill, device="cpu", precision="fp32")


def test_an_unknown_directory_is_one_line_and_exit_2(tmp_path, capsys):
    from fromage_bench.cli import main

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FromageInputError) as err:
        detect_family(unknown)
    assert "model_args.json: missing" in str(err.value) and "CLIP model" in str(err.value)
    write_vist(tmp_path / "data", n=2, seed=0)
    code = main(["eval", "--model-dir", str(unknown), "--data-root", str(tmp_path / "data"),
                 "--tasks", "vist_retrieval:1cap", "--out", str(tmp_path / "out"), "--no-progress"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and str(unknown / "model_args.json") in lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


# -- CLIP's queries ---------------------------------------------------------------------------------------
def _hand_text_embedding(raw, text: str) -> torch.Tensor:
    """CLIPModel.forward's text_embeds of BOS + the last 75 tokens + EOS (built here, not by the package)."""
    model, tokenizer, _ = raw
    ids = tokenizer(text, add_special_tokens=False).input_ids[-75:]
    ids = torch.tensor([[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]])
    dummy = torch.zeros(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=dummy).text_embeds[0]  # normalised by CLIPModel.forward


def _hand_image_embeddings(raw, paths, preprocess: str) -> torch.Tensor:
    model, _, processor = raw
    pixels = processor([prepare(open_image(p), preprocess) for p in paths], return_tensors="pt").pixel_values
    ids = torch.tensor([[0, 1]])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).image_embeds  # normalised


def test_a_long_text_keeps_its_end(clip, raw_clip):
    tail = " ".join(f"the {c} circle sat near square number {i} ." for i, c in enumerate(["red", "blue", "green"] * 4))
    long_a, long_b = "a dog ran " * 40 + tail, "one cat slept " * 40 + tail
    tokenizer = raw_clip[1]
    assert len(tokenizer(long_a, add_special_tokens=False).input_ids) > 77
    from model.clip_baseline import clip_text_ids

    ids = clip_text_ids(clip.tokenizer, long_a, 77)
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert ids[1:-1] == tokenizer(long_a, add_special_tokens=False).input_ids[-75:]
    a, b = clip.text_embeddings([long_a, long_b])
    assert torch.equal(a, b)  # the beginnings differ, the last 75 tokens do not: the end is what CLIP sees
    assert torch.allclose(a, _hand_text_embedding(raw_clip, long_a), atol=1e-6)
    short = clip.text_embeddings(["a red circle ."])[0]
    assert torch.allclose(short, _hand_text_embedding(raw_clip, "a red circle ."), atol=1e-6)


@pytest.mark.parametrize("setting", ["1cap", "5cap4img"])
def test_clip_vist_ranks_are_the_hand_computed_cosine_ranks(clip, raw_clip, vist, setting):
    root = Path(vist["root"])
    task = get_task("vist_retrieval")
    ctx = RunContext(model=clip, data_root=root, progress=False, batch_size=3)
    results = {r.protocol: r for r in task.run_cell(ctx, setting, ("paper", "corrected"))}
    stories, listed = load_stories(root / "vist/sis/val.story-in-sequence.json")
    pool = list(vist["pool"])
    paths = {p: next((root / "vist/images/val").glob(f"{p}.*")) for p in pool}
    sizes = {open_image(paths[p]).size for p in pool}
    assert any(w != h for w, h in sizes) and any(paths[p].suffix == ".jpg" for p in pool)  # awkward images
    column = {p: i for i, p in enumerate(pool)}
    for protocol, preprocess in (("paper", SQUASH), ("corrected", CROP)):
        images = _hand_image_embeddings(raw_clip, [paths[p] for p in pool], preprocess)
        expected = {}
        for story in stories:
            if story.story_id in vist["skipped"]:
                continue
            captions = story.captions[-1:] if setting == "1cap" else story.captions
            query = _hand_text_embedding(raw_clip, " ".join(captions))
            if setting == "5cap4img":  # our reading: the mean of the five unit vectors, renormalised
                query = F.normalize(torch.stack([query, *[images[column[p]] for p in story.context]]).mean(0), dim=0)
            scores = images @ query
            for p in story.context:
                scores[column[p]] -= MASK_PENALTY
            target = scores[column[story.target]]
            expected[story.story_id] = int((scores > target).sum()) + 1
        got = {p["story_id"]: p["rank"] for p in results[protocol].predictions}
        assert got == expected and len(got) >= 4
        r1 = 100 * sum(r <= 1 for r in expected.values()) / len(expected)
        assert results[protocol].metrics["R@1"] == pytest.approx(r1)
        assert results[protocol].extra["clip_readings"]["truncation"].startswith("text tower length")
        assert results[protocol].extra["image_preprocessing"] == preprocess
    assert results["paper"].paper == {"1cap": {"R@1": 11.9, "R@5": 25.5, "R@10": 32.2},
                                      "5cap4img": {"R@1": 2.4, "R@5": 21.3, "R@10": 34.0}}[setting]
    assert results["corrected"].paper is None


def test_clip_reads_strings_never_token_ids(clip):
    with pytest.raises(TypeError, match="not token ids"):
        clip.retrieval_embeddings([[torch.tensor([1, 2, 3])]])


# -- the runner: skipped cells, the model entry -----------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("families-data")
    write_visdial(root, n=3, seed=0, n_rounds=2)
    write_cc3m(root, n=4, seed=0)
    return root


def _eval(tmp_path, out_name, *model_args, tasks="visdial_retrieval,visdial_ranking,captioning:cc3m"):
    from fromage_bench.cli import main

    out = tmp_path / out_name
    code = main(["eval", *model_args, "--data-root", str(tmp_path / "data"), "--tasks", tasks, "--out", str(out),
                 "--no-progress", "--no-cache", "--precision", "fp32", "--device", "cpu"])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_clip_cells_it_cannot_do_are_skipped_with_the_reason(clip_dir, data_root, tmp_path):
    (tmp_path / "data").symlink_to(data_root)
    results = _eval(tmp_path, "clip", "--clip", str(clip_dir))
    assert results["model"] == {"family": "clip", "label": "clip", "source": str(clip_dir),
                                "source_state": source_state(clip_dir)}
    by_cell = {(r["task"], r["protocol"]): r for r in results["records"]}
    for protocol in ("paper", "corrected"):
        ranking = by_cell[("visdial_ranking", protocol)]
        assert ranking["status"] == "skipped" and "clip family cannot score continuations" in ranking["reason"]
        assert by_cell[("visdial_retrieval", protocol)]["status"] == "ok"
    assert by_cell[("captioning", "standard")]["status"] == "skipped"
    assert "cannot generate text" in by_cell[("captioning", "standard")]["reason"]
    assert by_cell[("visdial_retrieval", "paper")]["paper"] == {"R@1": 17.7, "R@5": 38.9, "R@10": 50.2}
    # a CLIP directory given as --model-dir is detected as one: the same records
    again = _eval(tmp_path, "clip-dir", "--model-dir", str(clip_dir))
    assert again["model"]["family"] == "clip"
    assert [r.get("metrics") for r in again["records"]] == [r.get("metrics") for r in results["records"]]


def test_fromage_records_name_their_family_and_keep_fromage_paper_numbers(tiny_dir, clip_dir, data_root, tmp_path):
    (tmp_path / "data").symlink_to(data_root)
    results = _eval(tmp_path, "fromage", "--model-dir", str(tiny_dir), "--label", "tiny", tasks="visdial_retrieval")
    assert results["model"] == {"family": "fromage", "label": "tiny", "source": str(tiny_dir),
                                "source_state": source_state(tiny_dir)}
    assert source_state(tiny_dir) != source_state(clip_dir) and source_state("openai/clip-vit-large-patch14") is None
    paper = {r["protocol"]: r["paper"] for r in results["records"]}
    assert paper == {"paper": {"R@1": 20.8, "R@5": 44.9, "R@10": 56.0}, "corrected": None}
    assert all("clip_readings" not in r["extra"] for r in results["records"])


def test_tasks_lists_what_each_family_supports(capsys):
    from fromage_bench.cli import main

    assert main(["tasks"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("    ") and ":" in line.split()[0] and len(line.split()) == 4}
    assert rows["visdial_ranking:val"] == ["yes", "yes", "no"] and rows["captioning:cc3m"] == ["yes", "no", "no"]
    assert rows["vist_retrieval:5cap4img"] == ["yes", "yes", "yes"]
