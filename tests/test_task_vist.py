"""vist_retrieval: data rules (grouping, order, pool, skips), prompts of both protocols, scoring, end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fromage_bench.synth.vist import IMAGE_DIR, JSON_PATH, write_vist
from model.errors import FromageInputError
from model.prompts import embed_prompt
from tasks import get_task
from tasks.base import RunContext
from tasks.cache import FeatureCache
from model.datasets import ImageDir
from tasks.vist import (MASK_PENALTY, build_prompt, corrected_prompt, load_stories, mask_context,
                        paper_prompt, pool_candidates, pool_scores, query_embeddings, read_pool, run,
                        scaled_pool, score_dtype, story_metrics, top_k)
from tests.conftest import solid_image

CAPTIONS = ("we saw a red circle .", "then there was a blue square .", "next to it stood a green star .",
            "later we found a big heart .", "at the end we saw a small ring .")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_vist(tmp_path_factory.mktemp("vist"), n=6, seed=0, missing=1, corrupt=1, png=1, shuffled=True)


def _ctx(model, root, **kw):
    return RunContext(model=model, data_root=root, progress=False, batch_size=kw.pop("batch_size", 4), **kw)


def _write_json(path, annotations, images=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [{"id": i, "url_o": ""} for i in images], "albums": [],
                                "annotations": annotations}))
    return path


def _ann(story, photo, order, text="a caption .", **drop):
    entry = {"story_id": story, "storylet_id": f"{story}{order}", "photo_flickr_id": photo, "album_id": "1",
             "worker_arranged_photo_order": order, "text": text, "original_text": text}
    for key in drop:
        entry.pop(key)
    return [entry]


# -- data ---------------------------------------------------------------------------------------------------
def test_stories_grouped_by_id_and_sorted_by_worker_order(tmp_path):
    # two stories interleaved in the file, each in scrambled order
    order_a, order_b = [3, 0, 4, 1, 2], [4, 2, 0, 3, 1]
    annotations = []
    for a, b in zip(order_a, order_b):
        annotations += [_ann("A", f"a{a}", a, f"story a line {a} ."), _ann("B", f"b{b}", b, f"story b line {b} .")]
    stories, listed = load_stories(_write_json(tmp_path / "sis.json", annotations, images=["b1", "a0"]))
    assert [s.story_id for s in stories] == ["A", "B"]
    assert stories[0].photo_ids == ("a0", "a1", "a2", "a3", "a4")
    assert stories[0].captions == tuple(f"story a line {k} ." for k in range(5))
    assert stories[1].target == "b4" and stories[1].context == ("b0", "b1", "b2", "b3")
    # pool order: the images list first, then unlisted photos by first use
    assert pool_candidates(stories, listed) == ["b1", "a0", "a1", "a2", "a3", "a4", "b0", "b2", "b3", "b4"]


def test_synth_shuffled_file_targets_the_worker_ordered_last_photo(tiny, synth):
    raw = json.loads(synth["json"].read_text())
    first_story = [a[0] for a in raw["annotations"] if a[0]["story_id"] == synth["story_ids"][0]]
    assert [e["worker_arranged_photo_order"] for e in first_story] != list(range(5))  # really shuffled
    result = run(_ctx(tiny, synth["root"]), "1cap", ("paper",))[0]
    for pred in result.predictions:
        assert pred["target"] == synth["targets"][pred["story_id"]]
        assert pred["captions"] == synth["captions"][pred["story_id"]]
        assert pred["context"] == synth["stories"][pred["story_id"]][:4]


@pytest.mark.parametrize("annotations, problem", [
    ([_ann("7", f"p{k}", k) for k in range(4)], "story 7 has 4 entries"),
    ([_ann("7", f"p{k}", k) for k in range(6)], "story 7 has 6 entries"),
    ([_ann("7", "p0", 0) + _ann("7", "p1", 1)] + [_ann("7", f"p{k}", k) for k in range(2, 5)], "one-element list"),
    ([_ann("7", "p0", 0)[0]] + [_ann("7", f"p{k}", k) for k in range(1, 5)], "one-element list"),
    ([_ann("7", f"p{k}", k) for k in range(4)] + [_ann("7", "p4", 4, text=None)], "story 7: .*text"),
    ([_ann("7", f"p{k}", k) for k in range(4)] + [_ann("7", "p4", 4, photo_flickr_id=1)], "story 7: .*photo_flickr_id"),
    ([_ann("7", f"p{k}", k) for k in range(4)] + [_ann("7", "p4", "4")], "story 7: .*not an integer"),
    ([_ann("7", f"p{k}", k) for k in range(4)] + [_ann("7", "p4", 3)], "story 7 repeats"),
])
def test_bad_structure_is_an_input_error_naming_file_and_story(tmp_path, annotations, problem):
    path = _write_json(tmp_path / "sis.json", annotations)
    with pytest.raises(FromageInputError, match=problem) as err:
        load_stories(path)
    assert str(path) in str(err.value)


def test_malformed_or_missing_json_is_an_input_error(tmp_path, tiny):
    bad = tmp_path / JSON_PATH
    bad.parent.mkdir(parents=True)
    (tmp_path / IMAGE_DIR).mkdir(parents=True)
    bad.write_text('{"annotations": [[{"story_id": ')
    with pytest.raises(FromageInputError, match="malformed JSON") as err:
        run(_ctx(tiny, tmp_path), "5cap4img", ("paper",))
    assert str(bad) in str(err.value)
    bad.write_text('{"images": []}')
    with pytest.raises(FromageInputError, match="no 'annotations' list"):
        load_stories(bad)
    bad.unlink()
    with pytest.raises(FromageInputError, match="not found") as err:
        load_stories(bad)
    assert str(bad) in str(err.value)


def test_no_readable_photo_at_all_is_an_input_error(tmp_path, tiny):
    _write_json(tmp_path / JSON_PATH, [_ann("1", f"p{k}", k) for k in range(5)])
    (tmp_path / IMAGE_DIR).mkdir(parents=True)
    with pytest.raises(FromageInputError, match="none of the 5 photos") as err:
        run(_ctx(tiny, tmp_path), "1cap", ("paper",))
    assert IMAGE_DIR in str(err.value)


def test_pool_keeps_readable_photos_of_skipped_stories_but_not_unused_ones(tiny, synth):
    stories, listed = load_stories(synth["json"])
    pool, features, failed = read_pool(tiny, stories, listed, ImageDir(synth["image_dir"]))
    assert pool == synth["pool"]
    assert failed == {**{p: "missing image" for p in synth["missing"]}, **{p: "corrupt image" for p in synth["corrupt"]}}
    assert set(features) == {"crop"} and set(features["crop"]) == set(pool)
    for sid in synth["skipped"]:  # the readable photos of skipped stories are candidates
        readable = [p for p in synth["stories"][sid] if p not in failed]
        assert readable and set(readable) <= set(pool)
    assert synth["unused"] and not set(synth["unused"]) & set(pool)
    assert all((synth["image_dir"] / f"{p}.jpg").is_file() for p in synth["unused"])  # they do have files


def test_png_photos_are_found(tiny, synth):
    png = synth["png"][0]
    assert (synth["image_dir"] / f"{png}.png").is_file() and not (synth["image_dir"] / f"{png}.jpg").exists()
    result = run(_ctx(tiny, synth["root"]), "5cap4img", ("corrected",))[0]
    evaluated = {p["story_id"] for p in result.predictions}
    png_stories = {sid for sid, photos in synth["stories"].items() if png in photos}
    assert png_stories - set(synth["skipped"]) <= evaluated and png_stories - set(synth["skipped"])
    assert png in synth["pool"] and result.extra["pool_size"] == len(synth["pool"])


# -- prompts: the paper protocol's per-caption BOS ------------------------------------------------------------
def test_paper_prompt_has_a_bos_per_caption_corrected_only_the_first(tiny):
    tok = tiny.model.tokenizer
    bos, ret = tok.bos_token_id, tok.convert_tokens_to_ids("[RET]")
    context = list(tiny.project_images(torch.randn(4, tiny.model.visual_model.config.hidden_size), "captioning"))
    paper = embed_prompt(tiny.model, paper_prompt(tok, CAPTIONS, context))
    corrected = embed_prompt(tiny.model, corrected_prompt(CAPTIONS, context))
    pieces = [tok(c, add_special_tokens=True).input_ids for c in CAPTIONS]
    assert all(p[0] == bos and bos not in p[1:] for p in pieces)
    expected_paper = sum(pieces, []) + [ret]
    expected_corrected = pieces[0] + sum((p[1:] for p in pieces[1:]), []) + [ret]
    assert paper.text_ids.tolist() == expected_paper
    assert corrected.text_ids.tolist() == expected_corrected
    assert (paper.text_ids == bos).sum() == 5 and (corrected.text_ids == bos).sum() == 1
    # [RET] glued to the last caption (no space token before it), and it is the last position in both
    assert tok(CAPTIONS[-1] + "[RET]").input_ids == pieces[-1] + [ret]
    assert paper.labels[-1] == ret and corrected.labels[-1] == ret
    # images in the same places: caption1 image1 ... image4 caption5 -> 4 runs of image positions
    n_vis = tiny.model.args.n_visual_tokens
    assert len(paper) - len(corrected) == 4 and (paper.labels == -100).sum() == 4 * n_vis
    first_image = len(pieces[0])
    assert (paper.labels[first_image:first_image + n_vis] == -100).all()
    assert paper.labels[first_image + n_vis] == bos and corrected.labels[first_image + n_vis] != bos
    # the BOS changes the query; with one caption both protocols are the same prompt
    one = [build_prompt(p, tok, CAPTIONS[-1:]) for p in ("paper", "corrected")]
    assert embed_prompt(tiny.model, one[0]).text_ids.tolist() == embed_prompt(tiny.model, one[1]).text_ids.tolist()
    five = tiny.retrieval_embeddings([paper_prompt(tok, CAPTIONS), corrected_prompt(CAPTIONS)])
    assert not torch.allclose(five[0], five[1], atol=1e-4)


def test_paper_protocol_matches_the_original_loop(tiny, synth):
    """The original script's computation, written out: per-caption tokenisation, input embeddings and
    captioning embeddings concatenated, last hidden state -> text_hidden_fcs[0] at the last position."""
    m = tiny.model
    stories, listed = load_stories(synth["json"])
    pool, features, failed = read_pool(tiny, stories, listed, ImageDir(synth["image_dir"]), preprocessings=("squash",))
    story = next(s for s in stories if s.story_id not in synth["skipped"])
    ours = query_embeddings(tiny, [story], "5cap4img", "paper", features["squash"], batch_size=2)[0]

    def original_pixels(pids):  # the script's loader: open, resize to 224x224, then RGB, then the processor
        images = [Image.open(ImageDir(synth["image_dir"]).find(p)).resize((224, 224)).convert("RGB") for p in pids]
        return m.feature_extractor(images, return_tensors="pt").pixel_values

    with torch.inference_mode():
        visual = m.get_visual_embs(original_pixels(story.context), mode="captioning")
        ids = [m.tokenizer(c + ("[RET]" if i == 4 else ""), add_special_tokens=True, return_tensors="pt").input_ids
               for i, c in enumerate(story.captions)]
        text = [m.input_embeddings(x)[0] for x in ids]
        sequence = torch.cat([t for pair in zip(text[:4], visual) for t in pair] + [text[4]])[None]
        out = m.lm(inputs_embeds=sequence, use_cache=False, output_hidden_states=True)
        original = m.text_hidden_fcs[0](out.hidden_states[-1])[0, -1]
        original = original / original.norm()
        torch.testing.assert_close(ours, original, atol=1e-5, rtol=1e-4)
        # and the ranking: scaled normalised pool, context minus 10000, top-k
        emb = m.get_visual_embs(original_pixels(pool), mode="retrieval")[:, 0]
        matrix = m.logit_scale.exp() * emb / emb.norm(dim=-1, keepdim=True)
        scores = original @ matrix.T
        for pid in story.context:
            scores[pool.index(pid)] -= 10000
        expected_top = [pool[i] for i in scores.topk(10).indices.tolist()]
    result = run(_ctx(tiny, synth["root"]), "5cap4img", ("paper",))[0]
    pred = next(p for p in result.predictions if p["story_id"] == story.story_id)
    assert pred["top10"] == expected_top
    assert pred["rank"] == 1 + int((scores > scores[pool.index(story.target)]).sum())


# -- scoring on hand-made numbers ------------------------------------------------------------------------------
def test_masking_ranking_and_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1, 0.3],
                           [0.2, 0.8, 0.8, 0.6, 0.4],
                           [0.4, 0.3, 0.9, 0.95, 0.1]])
    context = [[0, 2], [1], [3, 3]]   # a photo twice in one story's context is masked twice, as the original
    masked = mask_context(scores, context)
    assert masked[0, 0] == pytest.approx(0.9 - MASK_PENALTY) and masked[0, 1] == pytest.approx(0.5)
    assert masked[2, 3] == pytest.approx(0.95 - 2 * MASK_PENALTY)
    assert torch.equal(scores[0, 0], torch.tensor(0.9))  # input untouched
    targets = torch.tensor([1, 2, 0])
    # row 0: [m, .5, m, .1, .3] -> target 1 first; row 1: [.2, m, .8, .6, .4] -> 1st; row 2: [.4,.3,.9,m,.1] -> 2nd
    from tasks.metrics import ranks_from_scores
    ranks = ranks_from_scores(masked, targets)
    assert ranks.tolist() == [1, 1, 2]
    assert top_k(masked, 3).tolist() == [[1, 4, 3], [2, 3, 4], [2, 0, 1]]
    metrics = story_metrics(ranks)
    assert metrics == pytest.approx({"R@1": 200 / 3, "R@5": 100.0, "R@10": 100.0,
                                     "MRR": 100 * (1 + 1 + 0.5) / 3, "mean_rank": 4 / 3})
    # without the mask the first story's target would rank 3rd (0.9, 0.7 above it)
    assert ranks_from_scores(scores, targets).tolist()[0] == 3


def test_ties_rank_by_pool_index_and_scores_are_scaled_cosines():
    tied = torch.tensor([[0.5, 0.7, 0.7, 0.7]])
    assert top_k(tied, 4).tolist() == [[1, 2, 3, 0]]
    pool = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    matrix = scaled_pool(pool, torch.tensor(2.0))
    expected = torch.exp(torch.tensor(2.0)) * torch.tensor([[0.6, 0.8], [0.0, -1.0]])
    torch.testing.assert_close(matrix, expected)
    query = F.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)
    torch.testing.assert_close(query @ matrix.T, torch.exp(torch.tensor(2.0)) * torch.tensor([[0.7 * 2 ** 0.5, -(0.5 ** 0.5)]]))


# -- end to end ----------------------------------------------------------------------------------------------
def test_end_to_end_all_settings_both_protocols(tiny, synth, tmp_path):
    task = get_task("vist_retrieval")
    assert task.default_setting == "5cap4img" and task.settings == ("1cap", "5cap", "5cap4img")
    task.check_files(synth["root"])
    cache = FeatureCache(tmp_path / "cache", tiny.fingerprint)
    n_ok = len(synth["story_ids"]) - len(synth["skipped"])
    tiny.counters.clear()
    for setting in task.settings:
        results = task.run(_ctx(tiny, synth["root"], cache=cache, batch_size=3), setting, ("paper", "corrected"))
        assert [r.protocol for r in results] == ["paper", "corrected"]
        for r in results:
            assert r.task == "vist_retrieval" and r.setting == setting and r.n_examples == n_ok
            assert r.skipped.counts == {"missing image": 1, "corrupt image": 1}
            assert {e.split(":")[0] for e in r.skipped.examples} == set(synth["skipped"])
            assert set(r.metrics) == {"R@1", "R@5", "R@10", "MRR", "mean_rank"}
            assert 0 <= r.metrics["R@1"] <= r.metrics["R@5"] <= r.metrics["R@10"] <= 100
            assert r.extra["pool_size"] == len(synth["pool"]) and "CLIP ViT-L/14" in r.extra["paper_baselines"]
            assert len(r.predictions) == n_ok
            for pred in r.predictions:
                assert set(pred) == {"story_id", "target", "rank", "top10", "context", "captions"}
                assert len(pred["top10"]) == 10 and len(pred["captions"]) == 5
                assert not set(pred["context"]) & set(pred["top10"])  # context photos pushed out (13 others)
                if pred["rank"] <= 10:
                    assert pred["top10"][pred["rank"] - 1] == pred["target"]
                else:
                    assert pred["target"] not in pred["top10"]
            json.dumps(r.predictions)
        assert results[0].paper == task.paper[(setting, "paper")] and results[1].paper is None
        # 1cap builds the same prompt in both protocols, but the pool photos are squashed (paper) or cropped
        assert [r.extra["image_preprocessing"] for r in results] == ["squash", "crop"]
    assert task.paper[("5cap4img", "paper")] == {"R@1": 18.2, "R@5": 42.7, "R@10": 51.8}
    assert task.paper[("1cap", "paper")] == {"R@1": 11.3, "R@5": 24.6, "R@10": 32.1}
    assert task.paper[("5cap", "paper")] == {"R@1": 10.8, "R@5": 23.8, "R@10": 31.7}
    # each readable photo decoded and encoded once per preprocessing (paper squash, corrected crop) over the
    # three settings (the cache serves the rest)
    assert tiny.counters["images_encoded"] == 2 * len(synth["pool"])
    assert cache.hits == 2 * 2 * len(synth["pool"])


def test_limit_takes_the_first_stories_and_their_photos(tiny, synth):
    result = run(_ctx(tiny, synth["root"], limit=3), "5cap", ("corrected",))[0]
    first = synth["story_ids"][:3]
    assert result.extra["n_stories"] == 3
    assert result.n_examples + result.skipped.total == 3
    used = {p for sid in first for p in synth["stories"][sid]}
    assert result.extra["pool_size"] == len(used - set(synth["missing"]) - set(synth["corrupt"]))
    assert all(set(p["top10"]) <= used for p in result.predictions)


def test_png_and_jpg_mixed_in_a_hand_made_story(tmp_path, tiny):
    image_dir = tmp_path / IMAGE_DIR
    image_dir.mkdir(parents=True)
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (90, 90, 90)]
    for k, colour in enumerate(colours):
        solid_image(colour).save(image_dir / f"p{k}.{'png' if k % 2 else 'jpg'}")
    _write_json(tmp_path / JSON_PATH, [_ann("s", f"p{k}", k, CAPTIONS[k]) for k in range(5)])
    result = run(_ctx(tiny, tmp_path), "5cap4img", ("paper",))[0]
    assert result.n_examples == 1 and result.skipped.total == 0 and result.extra["pool_size"] == 5  # p5 unused
    pred = result.predictions[0]
    assert pred["top10"][0] == "p4" and pred["rank"] == 1 and sorted(pred["top10"][1:]) == ["p0", "p1", "p2", "p3"]


# -- paper numerics at low precision ---------------------------------------------------------------------
def _original_vist_scores(pool: torch.Tensor, query: torch.Tensor, logit_scale: torch.Tensor, context: list[int]):
    """The original script's scoring, written out, in `logit_scale.dtype`: the float32 pool features back in
    that dtype, normalised, times exp(logit_scale); the query normalised in it; one product; -10000 on the
    story's context photos, in that dtype."""
    emb_matrix = torch.tensor(pool.float().numpy(), dtype=logit_scale.dtype)
    emb_matrix = emb_matrix / emb_matrix.norm(dim=-1, keepdim=True)
    emb_matrix = logit_scale.exp() * emb_matrix
    ret_emb = query[None] / query[None].norm(dim=1, keepdim=True)
    scores = ret_emb.squeeze() @ emb_matrix.squeeze().T
    for column in context:
        scores[column] -= 10000
    return scores


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paper_scores_round_as_the_original_in_the_model_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(400, 16, generator=g).to(dtype)
    raw_queries = torch.randn(3, 16, generator=g).to(dtype)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    context = [[0, 5, 7, 9], [1, 2, 3, 4], [10, 11, 12, 13]]
    matrix = scaled_pool(pool, logit_scale, score_dtype("paper", dtype))
    queries = raw_queries / raw_queries.norm(dim=-1, keepdim=True)  # as retrieval_embeddings(normalize_in=dtype)
    ours = pool_scores(queries.float(), matrix, context)
    for row in range(3):
        expected = _original_vist_scores(pool, raw_queries[row], logit_scale, context[row])
        assert torch.equal(ours[row], expected.float())
    if dtype == torch.bfloat16:
        assert len(set(ours[0].tolist())) < 350  # bf16 makes candidates tie exactly
    # the original's CUDA `topk(10)` takes tied candidates in pool order (its radix-select gather writes the
    # strictly larger ones, then the first equal ones seen, in index order; the <=32-element sort is stable):
    # the pool-index rule of `top_k` / `ranks_from_scores`
    for row in range(3):
        s = ours[row]
        expected_top = sorted(range(len(s)), key=lambda j: (-s[j].item(), j))[:10]
        assert top_k(ours, 10)[row].tolist() == expected_top


def test_float32_scoring_is_unchanged():
    g = torch.Generator().manual_seed(1)
    pool, query = torch.randn(50, 8, generator=g), F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    logit_scale = torch.tensor(math.log(1 / 0.07))
    for protocol in ("paper", "corrected"):
        assert score_dtype(protocol, torch.float32) == torch.float32
        matrix = scaled_pool(pool, logit_scale, score_dtype(protocol, torch.float32))
        assert torch.equal(matrix, logit_scale.exp() * F.normalize(pool, dim=-1))
        assert torch.equal(pool_scores(query, matrix, [[0], [1]]), mask_context(query @ matrix.T, [[0], [1]]))
    assert score_dtype("corrected", torch.bfloat16) == torch.float32


def test_bf16_model_paper_queries_normalised_in_bf16_corrected_in_float32(tiny_dir, synth):
    from model import load_fromage

    model = load_fromage(tiny_dir, device="cpu", precision="bf16")
    stories, listed = load_stories(synth["json"])
    pool, features, failed = read_pool(model, stories, listed, ImageDir(synth["image_dir"]))
    story = next(s for s in stories if s.story_id not in synth["skipped"])
    paper = query_embeddings(model, [story], "5cap4img", "paper", features["crop"], batch_size=2)
    corrected = query_embeddings(model, [story], "5cap4img", "corrected", features["crop"], batch_size=2)
    assert torch.equal(paper, paper.bfloat16().float())
    assert not torch.equal(corrected, corrected.bfloat16().float())
    results = run(_ctx(model, synth["root"]), "5cap4img", ("paper", "corrected"))
    assert all(0 <= r.metrics["R@1"] <= r.metrics["R@10"] <= 100 for r in results)
