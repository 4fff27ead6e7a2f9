"""Self-checks of the independent references in tests/reference (not of model/)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

try:
    from tests.reference.original_fromage import OriginalStyleFromage, truncate_caption
    from tests.reference.tiny_release import (RELEASED_STATE_DICT_KEYS, padded_lm_vocab_size,
                                              write_tiny_release_dir)
except ImportError:  # pytest put tests/ (not the repo root) on sys.path
    from reference.original_fromage import OriginalStyleFromage, truncate_caption
    from reference.tiny_release import (RELEASED_STATE_DICT_KEYS, padded_lm_vocab_size,
                                        write_tiny_release_dir)

from safetensors.torch import load_file

TEXT_FILES = ("opt/vocab.json", "opt/merges.txt", "opt/tokenizer_config.json",
              "clip/preprocessor_config.json", "model_args.json")
TENSOR_FILES = ("opt/model.safetensors", "clip/model.safetensors")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny_release")
    return {
        "a": write_tiny_release_dir(base / "a", seed=0),
        "b": write_tiny_release_dir(base / "b", seed=0),
        "c": write_tiny_release_dir(base / "c", seed=1, n_visual_tokens=4),
    }


@pytest.fixture(scope="module")
def ref(dirs):
    return OriginalStyleFromage(dirs["a"])


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(90 + 20 * i, 160, 3) * 255).astype("uint8")) for i in range(3)]


def _ckpt(d):
    return torch.load(d / "pretrained_ckpt.pth.tar", map_location="cpu", weights_only=True)["state_dict"]


def _same_tensors(x, y):
    return set(x) == set(y) and all(
        x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def test_writes_deterministically(dirs):
    a, b, c = dirs["a"], dirs["b"], dirs["c"]
    for rel in TEXT_FILES:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for rel in TENSOR_FILES:
        assert _same_tensors(load_file(str(a / rel)), load_file(str(b / rel))), rel
    assert _same_tensors(_ckpt(a), _ckpt(b))
    # another seed gives other weights
    for rel in TENSOR_FILES:
        ta, tc = load_file(str(a / rel)), load_file(str(c / rel))
        key = next(k for k in ta if k.endswith("fc1.weight"))
        assert not torch.equal(ta[key], tc[key]), rel


def test_release_layout(dirs):
    for key, d in dirs.items():
        sd = _ckpt(d)
        assert set(sd) == set(RELEASED_STATE_DICT_KEYS)
        n_vis = 4 if key == "c" else 1
        assert sd["model.visual_embeddings.weight"].shape == (64 * n_vis, 32)
        assert sd["model.visual_fc.weight"].shape == (16, 32)
        assert sd["model.text_hidden_fcs.0.0.weight"].shape == (16, 64)
        assert sd["ret_input_embeddings.weight"].shape == (1, 64)
        assert sd["model.logit_scale"].shape == ()
        assert math.isclose(sd["model.logit_scale"].item(), math.log(1 / 0.07), rel_tol=1e-6)
        args = json.loads((d / "model_args.json").read_text())
        assert args["opt_version"] == "opt" and args["visual_encoder"] == "clip"
        assert args["n_visual_tokens"] == n_vis and args["unused_future_key"] == 1


def test_lm_vocab_larger_than_tokenizer(dirs, ref):
    cfg = json.loads((dirs["a"] / "opt" / "config.json").read_text())
    tok_len = len(ref.tokenizer)  # includes <|image|> and [RET]
    assert cfg["vocab_size"] > tok_len
    assert cfg["vocab_size"] == padded_lm_vocab_size(tok_len - 2)
    assert cfg["vocab_size"] % 8 == 0
    # resizing shrank the matrix to the tokenizer, keeping the leading rows
    emb = ref.lm.get_input_embeddings().weight
    assert emb.shape[0] == tok_len
    raw = load_file(str(dirs["a"] / "opt" / "model.safetensors"))["model.decoder.embed_tokens.weight"]
    keep = [i for i in range(tok_len) if i != ref.retrieval_token_idx]
    assert torch.equal(emb[keep], raw[keep])


def test_ret_token_and_row(dirs, ref):
    args = json.loads((dirs["a"] / "model_args.json").read_text())
    assert ref.retrieval_token_idx == args["retrieval_token_idx"] == len(ref.tokenizer) - 1
    ret_row = _ckpt(dirs["a"])["ret_input_embeddings.weight"][0]
    assert torch.equal(ref.input_embeddings.weight[ref.retrieval_token_idx], ret_row)
    # OPT ties the output head to the input embeddings
    assert torch.equal(ref.lm.get_output_embeddings().weight[ref.retrieval_token_idx], ret_row)
    assert ref.tokenizer("ab").input_ids[0] == ref.tokenizer.bos_token_id == 2


def test_log_lik_finite_and_text_dependent(ref, images):
    s1 = ref.get_log_lik_scores(["Q: what color is the dog?\nA: brown"])
    s2 = ref.get_log_lik_scores(["Q: what color is the dog?\nA: green"])
    s3 = ref.get_log_lik_scores([images[0], "Q: what color is the dog?\nA: brown"])
    assert all(math.isfinite(s) for s in (s1, s2, s3))
    assert s1 != s2 and s1 != s3 and s1 < 0


def test_hf_loss_matches_manual_shifted_ce(ref, images):
    prompts = [images[0], "a red dog runs", images[1], " in the park."]
    embs, text_ids, labels = ref.encode_prompts(prompts)
    n_vis = ref.n_visual_tokens
    assert labels.shape[1] == embs.shape[1] == text_ids.shape[1] + 2 * n_vis
    assert (labels[0, :n_vis] == -100).all()
    assert int((text_ids[0] == ref.tokenizer.bos_token_id).sum()) == 1  # BOS only once
    with torch.no_grad():
        logits = ref.lm(inputs_embeds=embs, use_cache=False).logits[0]
    pred, tgt = logits[:-1], labels[0, 1:]
    keep = tgt != -100
    manual = F.cross_entropy(pred[keep].double(), tgt[keep], reduction="sum") / keep.sum()
    assert ref.get_log_lik_scores(prompts) == pytest.approx(-manual.item(), rel=1e-5, abs=1e-5)


def test_greedy_tokens(ref, images):
    prompt = [images[0], "A picture of"]
    toks = ref.greedy_tokens(prompt, 7)
    assert len(toks) == 7 and all(isinstance(t, int) for t in toks)
    assert all(0 <= t < len(ref.tokenizer) for t in toks)
    assert toks == ref.greedy_tokens(prompt, 7)
    assert ref.greedy_tokens(prompt, 3) == toks[:3]  # no cache: prefix-consistent
    # first step by hand: argmax of the last logits after scaling the [RET] logit
    with torch.no_grad():
        last = ref.lm(inputs_embeds=ref.encode_prompts(prompt)[0]).logits[0, -1].clone()
    assert toks[0] == int(last.argmax())
    r = ref.retrieval_token_idx
    scale = 1e6 if last[r] > 0 else -1e6
    assert ref.greedy_tokens(prompt, 2, ret_scale_factor=scale)[0] == r
    assert isinstance(ref.generate_text(prompt, 7), str)


def test_num_words0_embeddings_and_ret_index(ref, images):
    text = "a dog on the beach[RET]"
    only_text = ref.ret_embeddings_num_words0([text])
    with_img = ref.ret_embeddings_num_words0([images[0], text])
    n_text = len(ref.tokenizer(text).input_ids)
    assert only_text.shape == (n_text, 16)
    assert with_img.shape == (n_text + ref.n_visual_tokens, 16)
    assert torch.allclose(with_img.norm(dim=-1), torch.ones(with_img.shape[0]), atol=1e-5)
    # the original looks [RET] up in the text-only ids: right without images, off by
    # n_visual_tokens with an image in front
    assert ref.original_ret_index([text]) == n_text - 1
    assert ref.original_ret_index([images[0], text]) == n_text - 1
    assert ref.original_ret_index(["no ret here"]) is None


def test_vis4_and_truncate_caption(dirs, images):
    ref4 = OriginalStyleFromage(dirs["c"])
    pv = ref4.pixel_values(images[2])[None]
    assert pv.shape == (1, 3, 224, 224)
    assert ref4.get_visual_embs(pv, "captioning").shape == (1, 4, 64)
    assert ref4.get_visual_embs(pv, "retrieval").shape == (1, 1, 16)
    assert truncate_caption("\na dog. a cat\nmore") == "a dog. a cat\n"
    assert truncate_caption("a dog. a cat") == "a dog."
    assert truncate_caption("no stop") == "no stop"
