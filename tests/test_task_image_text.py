"""image_text_retrieval: loaders of both formats, query construction, rank logic on hand-made scores, and
end-to-end runs of both settings on synthetic files with the tiny model (faults, limit, cache)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fromage_bench.synth.captions import write_cc3m, write_coco_karpathy
from model import FromageInputError
from tasks.base import REGISTRY, RunContext
from tasks.cache import FeatureCache
from tasks.caption_data import load_cc3m, load_karpathy
from tasks.image_text import (TASK, image_to_text_ranks, retrieval_prefix, retrieval_query_ids, run, summarise,
                              text_to_image_ranks)
from model.datasets import ImageDir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    cc3m = write_cc3m(root, n=10, seed=3, missing=1, corrupt=1, png=1)
    coco = write_coco_karpathy(root, n=6, seed=4, missing=1, corrupt=1, png=1)
    return root, cc3m, coco


@pytest.fixture(scope="module")
def cc3m_result(tiny, data):
    root, _, _ = data
    return run(RunContext(model=tiny, data_root=root, progress=False, batch_size=4), "cc3m", ("standard",))


# -- registration and layout ---------------------------------------------------------------------------------
def test_registered_with_both_settings_and_the_official_layout(data):
    root, cc3m, coco = data
    assert REGISTRY["image_text_retrieval"] is TASK
    assert TASK.settings == ("cc3m", "coco") and TASK.default_setting == "cc3m" and TASK.protocols == ("standard",)
    assert TASK.files == {"cc3m/captions": "cc3m/cc3m_val.tsv", "cc3m/images": "cc3m/validation",
                          "coco/captions": "coco/dataset_coco.json", "coco/images": "coco"}
    ctx = RunContext(model=None, data_root=root)
    assert TASK.path(ctx, "captions", "cc3m") == cc3m["tsv"] and TASK.path(ctx, "images", "coco") == coco["image_root"]
    for setting in TASK.settings:
        TASK.check_files(root, setting)


# -- query construction (the original validation's text side) -----------------------------------------------
def test_query_is_bos_caption_ret_without_space(tiny):
    tok, ret = tiny.model.tokenizer, tiny.model.retrieval_token_idx
    ids = retrieval_query_ids(tok, "a red circle", ret)
    assert ids == tok("a red circle", add_special_tokens=True).input_ids + [ret]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "a red circle[RET]"


def test_query_prefix_has_no_bos_and_comes_before_the_bos_led_caption(tiny):
    tok, ret = tiny.model.tokenizer, tiny.model.retrieval_token_idx
    prefix = tok("A picture of", add_special_tokens=False).input_ids
    ids = retrieval_query_ids(tok, "a dog", ret, prefix="A picture of")
    assert tok.bos_token_id not in prefix
    assert ids == prefix + retrieval_query_ids(tok, "a dog", ret)


def test_long_captions_are_cut_to_24_tokens_ending_in_ret(tiny):
    tok, ret = tiny.model.tokenizer, tiny.model.retrieval_token_idx
    caption = " ".join(["word"] * 40)
    full = tok(caption, add_special_tokens=True).input_ids
    ids = retrieval_query_ids(tok, caption, ret)
    assert len(ids) == 24 and ids[:23] == full[:23] and ids[-1] == ret
    assert len(retrieval_query_ids(tok, caption, ret, max_len=None)) == len(full) + 1
    short = "a dog"  # short enough: untouched
    assert len(tok(short).input_ids) < 23 and retrieval_query_ids(tok, short, ret) == tok(short).input_ids + [ret]


def test_prefix_comes_from_the_model_args():
    assert retrieval_prefix(SimpleNamespace(extra={"input_prompt": "A picture of", "add_input_to_ret": True})) == "A picture of"
    assert retrieval_prefix(SimpleNamespace(extra={"input_prompt": "A picture of"})) == "A picture of"
    assert retrieval_prefix(SimpleNamespace(extra={"input_prompt": "A picture of", "add_input_to_ret": False})) is None
    assert retrieval_prefix(SimpleNamespace(extra={})) is None


# -- rank logic on hand-made embeddings -------------------------------------------------------------------
def test_ranks_and_metrics_on_hand_made_scores():
    # 3 images (unit vectors e0, e1, e2) and 5 captions: owners [0, 0, 1, 2, 2]
    images = torch.eye(3)
    texts = torch.tensor([[0.9, 0.1, 0.0],    # c0 -> image 0 first: rank 1
                          [0.2, 0.8, 0.0],    # c1 (image 0) -> image 1 first: rank 2
                          [0.5, 0.5, 0.0],    # c2 (image 1) ties image 0 and 1: lower index first -> rank 2
                          [0.1, 0.3, 0.2],    # c3 (image 2) -> 1, 2, 0: rank 2
                          [0.6, 0.0, 0.6]])   # c4 (image 2) ties with image 0 -> rank 2
    owners = [0, 0, 1, 2, 2]
    t2i, t2i_top = text_to_image_ranks(texts, images, owners, k=2)
    assert t2i.tolist() == [1, 2, 2, 2, 2]
    assert t2i_top.tolist() == [[0, 1], [1, 0], [0, 1], [1, 2], [0, 2]]
    # image rows: image 0 scores captions [0.9, 0.2, 0.5, 0.1, 0.6] -> own best c0, rank 1
    # image 1: [0.1, 0.8, 0.5, 0.3, 0.0] -> own c2 (0.5) behind c1 (0.8): rank 2
    # image 2: [0.0, 0.0, 0.0, 0.2, 0.6] -> own best c4: rank 1
    i2t, best, _ = image_to_text_ranks(images, texts, owners)
    assert i2t.tolist() == [1, 2, 1] and best.tolist() == [0, 2, 4]
    m = summarise(t2i, i2t)
    assert m["t2i_R@1"] == pytest.approx(20.0) and m["t2i_R@5"] == 100.0 and m["t2i_mean_rank"] == pytest.approx(1.8)
    assert m["t2i_median_rank"] == 2.0
    assert m["i2t_R@1"] == pytest.approx(200 / 3) and m["i2t_mean_rank"] == pytest.approx(4 / 3)
    assert m["i2t_median_rank"] == 1.0 and m["i2t_R@10"] == 100.0


def test_i2t_rank_is_the_best_rank_among_own_captions_with_ties():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(7, 4, generator=g), dim=1)
    texts = F.normalize(torch.randn(20, 4, generator=g), dim=1)
    texts[5] = texts[3]  # tied captions, both owned by image 1 (and scored equal by everyone)
    owners = [i % 7 for i in range(20)]
    owners[3] = owners[5] = 1
    ranks, best, _ = image_to_text_ranks(images, texts, owners)
    scores = images @ texts.T
    for i in range(7):  # brute force: 1 + #better + #equal with lower index, min over own captions
        own = [c for c in range(20) if owners[c] == i]
        expect = min(1 + int((scores[i] > scores[i, c]).sum()) + int((scores[i, :c] == scores[i, c]).sum()) for c in own)
        assert ranks[i] == expect
    assert best[1] != 5  # of the tied pair, the lower index represents it


# -- loaders --------------------------------------------------------------------------------------------
def test_cc3m_loader_resolves_extensions_and_groups_rows(tmp_path):
    info = write_cc3m(tmp_path, n=4, seed=1, png=1, extensions_in_tsv=False)  # names as the released val TSV
    tsv = info["tsv"]
    lines = tsv.read_text().splitlines()
    lines.append(f"another caption for the first image\t{info['ids'][0]}.jpg")  # same file, with its extension
    tsv.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is fine
    items = load_cc3m(tsv, info["image_dir"])
    assert [it.image_id for it in items] == info["ids"]
    first = items[0]
    assert first.captions == [info["captions"][0], "another caption for the first image"]
    png = info["png"][0]
    assert next(it for it in items if it.image_id == png).path.suffix == ".png"
    assert len(load_cc3m(tsv, info["image_dir"], limit=2)) == 2


def test_karpathy_loader_reads_test_split_only_and_tolerates_flickr_style(tmp_path):
    info = write_coco_karpathy(tmp_path, n=3, seed=2, n_other=4)
    items = load_karpathy(info["json"], info["image_root"])
    assert [it.image_id for it in items] == info["ids"]
    assert all(len(it.captions) == 5 and it.path.is_file() for it in items)
    assert items[0].name.startswith("val2014/COCO_val2014_")
    # Flickr30k's file: no filepath / cocoid; images directly under the root, ids from imgid
    data = json.loads(info["json"].read_text())
    flickr = tmp_path / "flickr"
    flickr.mkdir()
    for e in data["images"]:
        (flickr / e["filename"]).write_bytes((info["image_root"] / e["filepath"] / e["filename"]).read_bytes())
        del e["filepath"], e["cocoid"]
    (flickr / "dataset_flickr30k.json").write_text(json.dumps(data))
    f_items = load_karpathy(flickr / "dataset_flickr30k.json", flickr, limit=2)
    assert len(f_items) == 2 and all(it.path.is_file() for it in f_items) and f_items[0].image_id.isdigit()


@pytest.mark.parametrize("content, match", [
    ("", "empty file"),
    ("image\tcaptions\textra\nx\ty\tz\n", "header"),
    ("caption\tpicture\na dog\tdog.jpg\n", "header"),
    ("a dog\tdog.jpg\n", "header"),
    ("caption\timage\na dog\tdog.jpg\tmore\n", "line 2: expected 2 tab-separated fields"),
    ("caption\timage\na dog\tdog.jpg\njust a caption\n", "line 3: empty or missing image name"),
    ("caption\timage\n\"a dog\tdog.jpg\n", "malformed TSV"),  # an opening quote never closed
    ("caption\timage\na dog\t../outside.jpg\n", "line 2: image path '../outside.jpg' escapes"),
    ("caption\timage\na dog\t\n", "line 2: empty or missing image name"),
    ("caption\timage\n\tdog.jpg\na dog\t\n", "line 2: empty caption"),  # the first faulty row is named
])
def test_bad_tsv_is_an_input_error_naming_the_file_and_line(tmp_path, content, match):
    (tmp_path / "validation").mkdir()
    tsv = tmp_path / "cc3m_val.tsv"
    tsv.write_text(content)
    with pytest.raises(FromageInputError, match=match) as err:
        load_cc3m(tsv, tmp_path / "validation")
    assert str(tsv) in str(err.value)


@pytest.mark.parametrize("content, match", [
    ("{not json", "malformed JSON"),
    ('{"annotations": []}', "`images` list"),
    ('{"images": [{"filename": "a.jpg", "sentences": []}]}', r"images\[0\]: missing or non-string `split`"),
    ('{"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"tokens": []}]}]}', r"sentences\[0\]"),
    ('{"images": [{"filepath": "..", "filename": "x.jpg", "split": "test", "sentences": [{"raw": "r"}]}]}', "escapes"),
])
def test_bad_karpathy_json_is_an_input_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "dataset_coco.json"
    path.write_text(content)
    with pytest.raises(FromageInputError, match=match) as err:
        load_karpathy(path, tmp_path)
    assert str(path) in str(err.value)


def test_image_dir_refuses_escapes_directly(tmp_path):
    with pytest.raises(FromageInputError, match="escapes"):
        ImageDir(tmp_path).path("/etc/passwd")


# -- end to end ---------------------------------------------------------------------------------------------
def test_cc3m_end_to_end_skips_faulty_images_and_matches_direct_embeddings(tiny, data, cc3m_result):
    _, cc3m, _ = data
    (result,) = cc3m_result
    assert result.protocol == "standard" and result.paper is None
    assert result.n_examples == 8 and result.extra["n_captions"] == 8
    assert result.skipped.counts == {"missing image": 1, "corrupt image": 1}
    assert set(result.metrics) == set(TASK.metrics)
    assert all(0 <= result.metrics[f"{d}_R@{k}"] <= 100 for d in ("t2i", "i2t") for k in (1, 5, 10))
    assert result.metrics["t2i_R@10"] == 100.0  # 8 candidates
    kept = [i for i, name in enumerate(cc3m["ids"]) if name not in cc3m["missing"] + cc3m["corrupt"]]
    # independent path: images through the model's own encoder (no cache, no feature loader), queries one
    # by one; the query ids are pinned by the tests above (the tiny tokenizer makes most captions > 24 tokens)
    from PIL import Image
    pil = [Image.open(cc3m["files"][cc3m["ids"][i]]).convert("RGB") for i in kept]
    img = F.normalize(tiny.encode_images(pil, "retrieval").float(), dim=1)
    tok, ret = tiny.model.tokenizer, tiny.model.retrieval_token_idx
    txt = torch.cat([tiny.retrieval_embeddings([[torch.tensor(retrieval_query_ids(tok, cc3m["captions"][i], ret))]])
                     for i in kept])
    scores = txt @ img.T
    t2i = [p for p in result.predictions if p["direction"] == "t2i"]
    for q, p in enumerate(t2i):
        expect = 1 + int((scores[q] > scores[q, q]).sum()) + int((scores[q, :q] == scores[q, q]).sum())
        assert p["rank"] == expect and p["target"] == cc3m["ids"][kept[q]]
    assert len([p for p in result.predictions if p["direction"] == "i2t"]) == 8
    json.dumps(result.predictions)


def test_coco_end_to_end_multi_caption_with_limit_and_cache(tiny, data, tmp_path):
    root, _, coco = data
    cache = FeatureCache(tmp_path / "cache", tiny.fingerprint)
    ctx = RunContext(model=tiny, data_root=root, progress=False, batch_size=8, cache=cache, limit=5)
    (first,) = run(ctx, "coco", ("standard",))
    faulty = set(coco["missing"] + coco["corrupt"])
    readable = [i for i in coco["ids"][:5] if i not in faulty]
    assert first.n_examples == len(readable) and first.extra["n_captions"] == 5 * len(readable)
    assert first.skipped.total == len(faulty & set(coco["ids"][:5]))
    i2t = [p for p in first.predictions if p["direction"] == "i2t"]
    assert [p["image_id"] for p in i2t] == readable
    assert all(p["rank"] <= 5 * len(readable) - 4 for p in i2t)  # best of 5 own captions
    assert cache.misses == len(readable)
    (second,) = run(ctx, "coco", ("standard",))
    assert cache.hits == len(readable) and second.metrics == first.metrics


def test_query_prefix_from_the_model_args_is_used(tiny, data, monkeypatch, cc3m_result):
    root, _, _ = data
    monkeypatch.setitem(tiny.model.args.extra, "input_prompt", "A picture of")
    (with_prefix,) = run(RunContext(model=tiny, data_root=root, progress=False, limit=4), "cc3m", ("standard",))
    assert with_prefix.extra["query_prefix"] == "A picture of"
    assert cc3m_result[0].extra["query_prefix"] is None


def test_no_readable_image_is_an_input_error(tiny, tmp_path):
    info = write_cc3m(tmp_path, n=2, missing=2)
    with pytest.raises(FromageInputError, match="none of its 2 images") as err:
        run(RunContext(model=tiny, data_root=tmp_path, progress=False), "cc3m", ("standard",))
    assert str(info["tsv"]) in str(err.value)
