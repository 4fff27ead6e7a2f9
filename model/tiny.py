"""`make_tiny`: a complete, tiny FROMAGe directory in the release format, built offline from a seed.

Layout: `opt/` (OPT weights + GPT-2-style byte-level BPE tokenizer trained here), `clip/` (CLIP vision
tower + image processor), `model_args.json` naming them by relative path, `pretrained_ckpt.pth.tar`.
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import CLIPVisionConfig, CLIPVisionModel, OPTConfig, OPTForCausalLM

from .args import ModelArgs
from .backbones import load_image_processor, load_tokenizer
from .checkpoint import save_release
from .files import save_pretrained
from .fromage import FromageModel

OPT_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT's vocabulary
TOKENIZER_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>",
                    "unk_token": "</s>", "pad_token": "<pad>", "model_max_length": 512, "errors": "replace"}

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink"]
_SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond"]
_PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle", "near the corner"]
_SIZES = ["small", "large", "tiny", "big"]


def builtin_corpus() -> list[str]:
    """Short captions, stories and dialogue turns over a small world of coloured shapes."""
    lines = []
    for colour, shape, place, size in itertools.product(_COLOURS, _SHAPES, _PLACES, _SIZES):
        lines.append(f"A {size} {colour} {shape} {place}.")
    for n, colour, shape in itertools.product(range(2, 6), _COLOURS, _SHAPES):
        lines.append(f"Q: how many {colour} {shape}s are there?\nA: {n}\nQ: is it {colour}?\nA: yes, it is {colour}")
        lines.append(f"There are {n} {shape}s. Then the {shape} turned {colour}. [RET]")
    return lines


def save_trained_tokenizer(out_dir: str | Path, vocab_size: int = 1000) -> None:
    """Train a byte-level BPE tokenizer (OPT's special tokens and GPT-2 pre-tokenisation) and save it."""
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(builtin_corpus(), vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=OPT_SPECIAL_TOKENS, show_progress=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_model(str(out_dir))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))


def tiny_opt_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4) -> OPTConfig:
    return OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=hidden * 4, num_hidden_layers=layers,
                     num_attention_heads=heads, max_position_embeddings=512, word_embed_proj_dim=hidden,
                     dropout=0.0, attention_dropout=0.0, init_std=0.2, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def tiny_clip_config(hidden: int = 32, layers: int = 2, heads: int = 2) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=224, patch_size=32, initializer_factor=5.0)


def padded_vocab_size(n_tokens: int) -> int:
    """Like OPT (50272 rows for 50265 + 2 tokens): more rows than tokens, so loading shrinks the matrix."""
    return (n_tokens + 2 + 7) // 8 * 8 + 8


def _write_tiny_backbones(out_dir: Path, vocab_rows: int, tokenizer_size: int, hidden: int, layers: int):
    """Save a tiny OPT (`vocab_rows` embedding rows) in out_dir/opt and a tiny CLIP vision tower with its processor in
    out_dir/clip; return (lm resized to the tokenizer as the loaders resize it, vision, processor)."""
    lm = OPTForCausalLM(tiny_opt_config(vocab_rows, hidden=hidden, layers=layers)).eval()
    save_pretrained(lm, out_dir / "opt")
    vision = CLIPVisionModel(tiny_clip_config()).eval()
    save_pretrained(vision, out_dir / "clip")
    processor = load_image_processor(None)
    save_pretrained(processor, out_dir / "clip")
    lm.resize_token_embeddings(tokenizer_size, mean_resizing=False)
    return lm, vision, processor


def make_tiny(out_dir: str | Path, seed: int = 0, n_visual_tokens: int = 1, *, shared_emb_dim: int = 32,
              hidden: int = 64, layers: int = 2) -> Path:
    """Write a tiny FROMAGe model directory; the same seed gives the same tensors."""
    out_dir = Path(out_dir)
    random.seed(seed)
    torch.manual_seed(seed)
    save_trained_tokenizer(out_dir / "opt")
    tokenizer = load_tokenizer(out_dir / "opt")
    base_tokens = len(tokenizer) - 2  # before <|image|> and [RET]

    lm, vision, processor = _write_tiny_backbones(out_dir, padded_vocab_size(base_tokens), len(tokenizer), hidden, layers)
    args = ModelArgs(opt_version="opt", visual_encoder="clip", n_visual_tokens=n_visual_tokens,
                     shared_emb_dim=shared_emb_dim)
    model = FromageModel(args, tokenizer, lm, vision, processor, torch.float32)
    with torch.no_grad():  # trained parts: seeded, with enough spread that outputs differ between inputs
        for fc in [model.visual_embeddings, model.visual_fc] + [seq[0] for seq in model.text_hidden_fcs]:
            fc.weight.normal_(0.0, 0.2)
            fc.bias.normal_(0.0, 0.02)
        model.input_embeddings.weight[model.retrieval_token_idx].normal_(0.0, 0.2)
    save_release(model, out_dir, args)
    return out_dir


def make_tiny_gill(out_dir: str | Path, seed: int = 0, n_visual_tokens: int = 4, *, ret_emb_dim: int = 32,
                   gen_emb_dim: int = 16, hidden: int = 64, layers: int = 2) -> Path:
    """Write a tiny GILL release directory (`model.gill`'s layout): 8 `[IMG]` tokens, like the release's, and an
    LM with 7 embedding rows beyond its tokenizer, like OPT's, so that loading grows the matrix as GILL's does.
    The generation map is a small "linear" one (GILL's 512-wide `gill_mapper` would dwarf the model); it is
    written, never read. A decision model is written too."""
    from torch import nn

    from .gill import GillArgs, GillModel, img_tokens, save_gill_release

    out_dir = Path(out_dir)
    random.seed(seed)
    torch.manual_seed(seed)
    save_trained_tokenizer(out_dir / "opt")
    args = GillArgs(opt_version="opt", visual_encoder="clip", n_visual_tokens=n_visual_tokens, ret_emb_dim=ret_emb_dim,
                    gen_emb_dim=gen_emb_dim, text_fc_mode="linear", num_clip_tokens=1,
                    extra={"norm_image_embed": "none"})
    tokenizer = load_tokenizer(out_dir / "opt", added_tokens=tuple(img_tokens(args.num_tokens)))
    base_tokens = len(tokenizer) - 1 - args.num_tokens  # before <|image|> and the [IMG] tokens

    lm, vision, processor = _write_tiny_backbones(out_dir, base_tokens + 7, len(tokenizer), hidden, layers)
    model = GillModel(args, tokenizer, lm, vision, processor, torch.float32)
    with torch.no_grad():  # trained parts: seeded, with enough spread that outputs differ between inputs
        for fc in [model.visual_embeddings, model.visual_fc] + [m.model for m in model.ret_text_hidden_fcs]:
            fc.weight.normal_(0.0, 0.2)
            fc.bias.normal_(0.0, 0.02)
        model.input_embeddings.weight[model.img_token_ids].normal_(0.0, 0.2)
        gen_map = {"model.gen_text_hidden_fcs.0.model.weight": torch.randn(gen_emb_dim, hidden) * 0.2,
                   "model.gen_text_hidden_fcs.0.model.bias": torch.zeros(gen_emb_dim)}
        decision = nn.Sequential(nn.Dropout(0.5), nn.Linear(hidden, 2))
    return save_gill_release(model, out_dir, gen_map, decision)
