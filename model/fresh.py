"""The models training starts from: the original recipe's initial state (a fresh start), or a release directory.

A fresh start (`fromage-bench train --init fresh --opt-version ID|DIR --visual-model ID|DIR`) is what the original
`main.py` builds before its first step:

- the pretrained OPT and CLIP, frozen; the tokenizer with `<|image|>` and `[RET]` added, and the LM's embedding
  matrix resized to the tokenizer with `resize_token_embeddings` (real OPT has 50272 rows for 50265 + 2 tokens,
  so the matrix shrinks and `[RET]` keeps the pretrained row it lands on: that row is its initial value);
- the trained maps (`text_hidden_fcs`, `visual_embeddings`, `visual_fc`) with `nn.Linear`'s default init, drawn
  from the torch generator seeded with `seed` before the backbones load, in the original's order;
- `logit_scale = log(1 / 0.07)`.

Precision (see docs/training.md, "Memory"): the frozen backbones are loaded in the training precision (bf16 on
CUDA), so no fp32 copy of the 6.7B frozen weights exists; the trained tensors are kept in `trained_dtype` (fp32).

A release directory (`--model-dir`) is the same model with its checkpoint's trained tensors copied in (in fp32,
whatever the backbones' precision). Neither path loads a retrieval set: training does not use one, and CC3M's
would take 3.4 GB of GPU memory.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .args import ModelArgs, read_model_args
from .backbones import load_image_processor, load_language_model, load_tokenizer, load_vision_model, resolve_backbone
from .checkpoint import CHECKPOINT_FILE, RET_ROW_KEY, apply_trained_weights, read_state_dict, save_release
from .fromage import FromageModel
from .precision import Placement


def build_initial_model(args: ModelArgs, placement: Placement, *, base_dir: str | Path | None = None, seed: int = 0,
                        trained_dtype: torch.dtype = torch.float32) -> FromageModel:
    """The original's initial state for `args` (the module docstring): backbones named by `args.opt_version` /
    `args.visual_encoder` (a directory, relative to `base_dir` first, or a Hugging Face id in the local cache)
    in `placement`'s precision, fresh trained maps in `trained_dtype`."""
    opt_path = resolve_backbone(args.opt_version, base_dir, "language model (opt_version)")
    vision_path = resolve_backbone(args.visual_encoder, base_dir, "vision encoder (visual_encoder)")
    # One seed, then the original's order (LM, resize, vision tower, maps): loading draws from the generator too
    # (transformers initialises the modules it then overwrites), so the maps' init is that of the original's
    # code under the same seed, and the stand-ins' untrained models keep the tensors they always had.
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(opt_path)
    lm = load_language_model(opt_path, placement)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    vision = load_vision_model(vision_path, placement)
    processor = load_image_processor(vision_path)
    model = FromageModel(args, tokenizer, lm, vision, processor, trained_dtype)
    model.eval().requires_grad_(False)
    return model


def load_release_for_training(model_dir: str | Path, placement: Placement, *, opt_version: str | None = None,
                              visual_model: str | None = None,
                              trained_dtype: torch.dtype = torch.float32) -> tuple[FromageModel, torch.Tensor]:
    """A release directory's model with the backbones in `placement`'s precision and the trained tensors in
    `trained_dtype`; returns (model, the checkpoint's [RET] row in `trained_dtype`), the row at full precision
    because the embedding matrix it is also written into may be bf16."""
    args = read_model_args(model_dir)
    args.opt_version = opt_version or args.opt_version
    args.visual_encoder = visual_model or args.visual_encoder
    state_dict = read_state_dict(Path(model_dir) / CHECKPOINT_FILE)  # validated before the slow backbone loads
    model = build_initial_model(args, placement, base_dir=model_dir, trained_dtype=trained_dtype)
    apply_trained_weights(model, state_dict, Path(model_dir) / CHECKPOINT_FILE)
    ret_row = state_dict[RET_ROW_KEY].reshape(-1).to(device=model.device, dtype=trained_dtype)
    return model, ret_row


def write_untrained_fromage(out_dir: str | Path, opt_dir: str | Path, clip_dir: str | Path, seed: int = 0, *,
                            n_visual_tokens: int = 1, shared_emb_dim: int = 256, text_emb_layers: list[int] | None = None,
                            extra: dict | None = None) -> Path:
    """A release directory holding the initial state (fp32): `model_args.json` naming the backbones by a path
    relative to `out_dir`, and `pretrained_ckpt.pth.tar`; `load_fromage(out_dir)` loads it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ModelArgs(opt_version=os.path.relpath(opt_dir, out_dir), visual_encoder=os.path.relpath(clip_dir, out_dir),
                     n_visual_tokens=n_visual_tokens, shared_emb_dim=shared_emb_dim,
                     text_emb_layers=list(text_emb_layers or [-1]), extra=dict(extra or {}))
    model = build_initial_model(args, Placement(torch.device("cpu"), "fp32"), base_dir=out_dir, seed=seed)
    save_release(model, out_dir, args)
    return out_dir
