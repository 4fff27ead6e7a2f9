"""Paper-scale random init: true-size backbones from the shipped configurations, no weights or downloads."""
import pytest
import torch

from model import FromageInputError, load_fromage

# facebook/opt-125m's published parameter count (embedding rows 50272, lm_head tied to them).
OPT_125M_PARAMS = 125_239_296
# ViT-B/32 vision tower counted by hand: patch conv 3*32*32*768, class token 768, 50 positions * 768,
# pre/post LayerNorm 2 * 1536, and 12 layers of [4 attention projections (768*768 + 768), two LayerNorms
# (4 * 768), MLP 768*3072 + 3072 + 3072*768 + 768].
CLIP_B32_VISION_PARAMS = (3 * 32 * 32 * 768 + 768 + 50 * 768 + 2 * 1536
                          + 12 * (4 * (768 * 768 + 768) + 4 * 768 + 768 * 3072 + 3072 + 3072 * 768 + 768))


@pytest.fixture(scope="module")
def paper_small():
    return load_fromage(None, random_init=True, opt_version="facebook/opt-125m",
                        visual_model="openai/clip-vit-base-patch32", device="cpu", precision="bf16")


def test_true_sizes(paper_small):
    model = paper_small.model
    assert sum(p.numel() for p in model.lm.parameters()) == OPT_125M_PARAMS
    assert sum(p.numel() for p in model.visual_model.parameters()) == CLIP_B32_VISION_PARAMS
    assert model.lm.get_input_embeddings().num_embeddings == 50272  # not shrunk to the stand-in tokenizer
    # trained maps as in the paper: visual_embeddings 768 -> 768, visual_fc 768 -> 256, text fc 768 -> 256
    assert model.visual_embeddings.weight.shape == (768, 768)
    assert model.visual_fc.weight.shape == (256, 768)
    assert model.text_hidden_fcs[0][0].weight.shape == (256, 768)
    assert paper_small.weight_bytes == pytest.approx(2 * sum(p.numel() for p in model.parameters()), rel=0.01)


def test_runs_end_to_end(paper_small, images):
    out = paper_small.generate([[images[0], "A picture of"]], 4)
    assert out.token_ids.shape == (1, 4)
    scores = paper_small.score_continuations([images[0], "Q: colour?\nA:"], [" red", " blue"])
    assert torch.isfinite(scores.sum_logprob).all()


def test_same_seed_same_weights():
    kw = dict(random_init=True, opt_version="facebook/opt-125m", visual_model="openai/clip-vit-base-patch32",
              device="cpu", precision="bf16")
    a, b = load_fromage(None, seed=1, **kw), load_fromage(None, seed=1, **kw)
    assert torch.equal(a.model.visual_fc.weight, b.model.visual_fc.weight)
    assert torch.equal(a.model.lm.lm_head.weight, b.model.lm.lm_head.weight)


def test_unknown_paper_config():
    with pytest.raises(FromageInputError, match="choose one of .*opt-6.7b"):
        load_fromage(None, random_init=True, opt_version="facebook/opt-13b", device="cpu")
