"""Writer of tiny FROMAGe model directories in the release layout.

The layout mirrors what the released FROMAGe model directory plus its two frozen
backbones look like, scaled down so that everything runs on a CPU in seconds::

    out_dir/
      opt/                    byte-level BPE tokenizer (GPT-2 style files) + tiny OPTForCausalLM
      clip/                   tiny CLIPVisionModel + OpenAI-CLIP preprocessor_config.json
      model_args.json         released keys (+ one unknown key), backbones as relative paths
      pretrained_ckpt.pth.tar {'state_dict': {...}} with exactly the released trained tensors

Only ``tokenizers``, ``transformers`` and ``torch`` are used; nothing from the
project packages (``model``, ``fromage_bench``) is imported.

Every tensor is drawn from a ``torch.Generator`` seeded from ``seed`` and the
parameters are visited in sorted-name order, so the bytes of every tensor depend
only on ``seed`` and the shapes, not on the Hugging Face initialisation code.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

# Sizes of the tiny backbones.
LM_HIDDEN = 64
LM_FFN = 128
LM_LAYERS = 2
LM_HEADS = 4
LM_MAX_POSITIONS = 512
CLIP_HIDDEN = 32
CLIP_INTERMEDIATE = 64
CLIP_LAYERS = 2
CLIP_HEADS = 2
CLIP_IMAGE_SIZE = 224
CLIP_PATCH = 32
SHARED_EMB_DIM = 16
TOKENIZER_TARGET_VOCAB = 700

# Standard deviations used for the random tensors.
LM_WEIGHT_STD = 0.2
TRAINED_STD = 0.2

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT

TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "add_bos_token": True,
    "bos_token": "</s>",
    "eos_token": "</s>",
    "unk_token": "</s>",
    "pad_token": "<pad>",
    "model_max_length": 512,
}

# Same content as the preprocessor_config.json of openai/clip-vit-large-patch14
# (legacy feature-extractor format, i.e. what the released setup actually reads).
CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

RELEASED_STATE_DICT_KEYS = (
    "model.logit_scale",
    "model.visual_embeddings.weight",
    "model.visual_embeddings.bias",
    "model.visual_fc.weight",
    "model.visual_fc.bias",
    "model.text_hidden_fcs.0.0.weight",
    "model.text_hidden_fcs.0.0.bias",
    "ret_input_embeddings.weight",
)

_COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink", "gray"]
_NOUNS = ["dog", "cat", "man", "woman", "child", "car", "bird", "horse", "house", "tree",
          "boat", "table", "cake", "ball", "girl", "boy", "train", "bike", "flower", "beach"]
_VERBS = ["sits", "runs", "stands", "plays", "walks", "sleeps", "jumps", "waits", "looks", "rests"]
_PREPS = ["on", "in", "near", "under", "behind", "next to", "at", "by"]
_PLACES = ["park", "street", "kitchen", "field", "river", "garden", "city", "room", "road", "sea"]
_ADJS = ["big", "small", "old", "young", "happy", "tall", "little", "large", "pretty", "busy"]
_QWORDS = ["what", "where", "who", "how many", "is there", "does the", "can you see"]


def _sentence(rng: random.Random) -> str:
    """One short English-like sentence drawn from the word lists."""
    kind = rng.randrange(8)
    c, n, v = rng.choice(_COLORS), rng.choice(_NOUNS), rng.choice(_VERBS)
    p, pl, a = rng.choice(_PREPS), rng.choice(_PLACES), rng.choice(_ADJS)
    if kind == 0:
        return f"A picture of a {a} {c} {n} {v} {p} the {pl}."
    if kind == 1:
        return f"Q: what color is the {n}?\nA: {c}"
    if kind == 2:
        return f"Q: how many {n}s are there?\nA: {rng.randint(0, 12)}"
    if kind == 3:
        return f"Q: {rng.choice(_QWORDS)} the {n} {v}?\nA: {rng.choice(['yes', 'no', 'maybe'])}, it {v} {p} the {pl}."
    if kind == 4:
        return f"The {a} {n} has {rng.randint(2, 99)} {rng.choice(_NOUNS)}s in {1900 + rng.randint(0, 125)}."
    if kind == 5:
        return f"a {c} {n} {v} {p} a {a} {rng.choice(_NOUNS)}"
    if kind == 6:
        return f"We went to the {pl} and saw a {n}.\nIt was {a} and {c}!"
    return f"Photo {rng.randint(1, 500)}: the {n}, the {rng.choice(_NOUNS)} and the {pl}?"


def make_corpus(seed: int = 0, n_sentences: int = 400) -> list[str]:
    """A small deterministic English corpus (Q:/A: pairs, '?', newlines, digits)."""
    rng = random.Random(1000 + seed)
    corpus = [_sentence(rng) for _ in range(n_sentences)]
    # A few fixed lines so that the basic symbols are always present.
    corpus += ["Q: ?\nA: .", "0 1 2 3 4 5 6 7 8 9 10 100", "Q: A: Q: A:\n\n"]
    return corpus


def padded_lm_vocab_size(tokenizer_len: int) -> int:
    """Embedding rows of the tiny LM: (len(tokenizer) + 2) rounded up to 8, plus 8.

    Like the real OPT (50272 rows for 50265 tokens + 2 added tokens), the matrix is
    strictly larger than the final tokenizer, so resizing only shrinks it.
    """
    with_added = tokenizer_len + 2
    return ((with_added + 7) // 8) * 8 + 8


def _fill_(params: list[tuple[str, torch.Tensor]], gen: torch.Generator, weight_std) -> None:
    """Deterministically overwrite every parameter (sorted by name)."""
    for name, p in sorted(params, key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name.lower()
        if is_norm and leaf == "weight":
            vals = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif is_norm or leaf == "bias":
            vals = 0.05 * torch.randn(p.shape, generator=gen)
        else:
            vals = weight_std(name, p) * torch.randn(p.shape, generator=gen)
        with torch.no_grad():
            p.copy_(vals.to(p.dtype))


def _lm_std(name: str, p: torch.Tensor) -> float:
    return LM_WEIGHT_STD


def _clip_std(name: str, p: torch.Tensor) -> float:
    # Linear / conv weights: fan-in scaled so activations stay O(1); embeddings: LM_WEIGHT_STD.
    if p.dim() >= 2 and "position_embedding" not in name:
        return 1.5 / math.sqrt(p[0].numel())
    return LM_WEIGHT_STD


def _write_tokenizer(opt_dir: Path, seed: int) -> int:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        make_corpus(seed),
        vocab_size=TOKENIZER_TARGET_VOCAB,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    vocab = bpe.get_vocab()
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert vocab[tok] == i, (tok, vocab[tok])
    bpe.save_model(str(opt_dir))
    (opt_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    return bpe.get_vocab_size()


def _retrieval_token_idx(opt_dir: Path) -> tuple[int, int]:
    """(id of [RET], len(tokenizer)) after the original's tokenizer set-up."""
    from transformers import GPT2Tokenizer

    tok = GPT2Tokenizer.from_pretrained(str(opt_dir), local_files_only=True)
    tok.pad_token = tok.eos_token
    tok.add_special_tokens({"cls_token": "<|image|>"})
    tok.add_tokens("[RET]")
    ids = tok("[RET]", add_special_tokens=False).input_ids
    assert len(ids) == 1, ids
    return ids[0], len(tok)


def _write_lm(opt_dir: Path, vocab_size: int, seed: int) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=LM_HIDDEN,
        ffn_dim=LM_FFN,
        num_hidden_layers=LM_LAYERS,
        num_attention_heads=LM_HEADS,
        max_position_embeddings=LM_MAX_POSITIONS,
        word_embed_proj_dim=LM_HIDDEN,
        do_layer_norm_before=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        activation_function="relu",
        init_std=LM_WEIGHT_STD,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    lm = OPTForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(10_000 + seed)
    _fill_(list(lm.named_parameters()), gen, _lm_std)
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    lm.save_pretrained(str(opt_dir))


def _write_clip(clip_dir: Path, seed: int) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=CLIP_HIDDEN,
        intermediate_size=CLIP_INTERMEDIATE,
        num_hidden_layers=CLIP_LAYERS,
        num_attention_heads=CLIP_HEADS,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=CLIP_PATCH,
        num_channels=3,
        hidden_act="quick_gelu",
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    vm = CLIPVisionModel(cfg).eval()
    gen = torch.Generator().manual_seed(20_000 + seed)
    _fill_(list(vm.named_parameters()), gen, _clip_std)
    vm.save_pretrained(str(clip_dir))
    (clip_dir / "preprocessor_config.json").write_text(
        json.dumps(CLIP_PREPROCESSOR_CONFIG, indent=2) + "\n")


def _trained_state_dict(seed: int, n_visual_tokens: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(30_000 + seed)

    def rnd(*shape: int) -> torch.Tensor:
        return TRAINED_STD * torch.randn(*shape, generator=gen)

    sd = {
        "model.logit_scale": torch.ones([]) * float(math.log(1 / 0.07)),
        "model.text_hidden_fcs.0.0.bias": rnd(SHARED_EMB_DIM),
        "model.text_hidden_fcs.0.0.weight": rnd(SHARED_EMB_DIM, LM_HIDDEN),
        "model.visual_embeddings.bias": rnd(LM_HIDDEN * n_visual_tokens),
        "model.visual_embeddings.weight": rnd(LM_HIDDEN * n_visual_tokens, CLIP_HIDDEN),
        "model.visual_fc.bias": rnd(SHARED_EMB_DIM),
        "model.visual_fc.weight": rnd(SHARED_EMB_DIM, CLIP_HIDDEN),
        "ret_input_embeddings.weight": rnd(1, LM_HIDDEN),
    }
    assert set(sd) == set(RELEASED_STATE_DICT_KEYS)
    return dict(sorted(sd.items()))


def write_tiny_release_dir(out_dir, seed: int = 0, n_visual_tokens: int = 1) -> Path:
    """Write a tiny FROMAGe release directory into ``out_dir`` and return its path."""
    out = Path(out_dir)
    opt_dir, clip_dir = out / "opt", out / "clip"
    opt_dir.mkdir(parents=True, exist_ok=True)
    clip_dir.mkdir(parents=True, exist_ok=True)

    base_vocab = _write_tokenizer(opt_dir, seed)
    ret_idx, tok_len = _retrieval_token_idx(opt_dir)
    assert tok_len == base_vocab + 2, (tok_len, base_vocab)
    lm_vocab = padded_lm_vocab_size(base_vocab)
    assert lm_vocab > tok_len
    _write_lm(opt_dir, lm_vocab, seed)
    _write_clip(clip_dir, seed)

    model_args = {
        "opt_version": "opt",
        "task": "multitask",
        "freeze_lm": True,
        "visual_encoder": "clip",
        "freeze_vm": True,
        "pretrained_visual": True,
        "use_pooler": True,
        "n_visual_tokens": int(n_visual_tokens),
        "image_embed_dropout_prob": 0.0,
        "text_embed_dropout_prob": 0.0,
        "shared_emb_dim": SHARED_EMB_DIM,
        "text_emb_layers": [-1],
        "append_retrieval_token": True,
        "num_appended_retrieval_tokens": 1,
        "input_prompt": "A picture of",
        "add_input_to_ret": True,
        "tunable_prompt_length": 0,
        "retrieval_token_idx": int(ret_idx),
        "unused_future_key": 1,
    }
    (out / "model_args.json").write_text(json.dumps(model_args, indent=4) + "\n")

    torch.save({"state_dict": _trained_state_dict(seed, n_visual_tokens)},
               str(out / "pretrained_ckpt.pth.tar"))
    return out
