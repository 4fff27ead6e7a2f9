"""Writer of tiny GILL model directories in GILL's release layout (kohjingyu/gill, `checkpoints/gill_opt/`).

    out_dir/
      opt/                     byte-level BPE tokenizer + tiny OPTForCausalLM with 7 embedding rows beyond the
                               tokenizer (OPT-6.7B: 50265 tokens, 50272 rows), so that GILL's 9 added tokens
                               (<|image|>, [IMG0]..[IMG7]) make the loader GROW the matrix by 2 rows
      clip/                    tiny CLIPVisionModel + OpenAI-CLIP preprocessor_config.json
      model_args.json          the released keys (text_fc_mode gill_mapper, share_ret_gen, norm_image_embed,
                               retrieval_token_idx / gen_token_idx lists) + one unknown key
      pretrained_ckpt.pth.tar  {'state_dict': ...} as GILL's scripts/prune_model_ckpt.py leaves it: the trained
                               maps, the generation mapper (GILL's gill_mapper architecture, narrower), and
                               `model.input_embeddings.weight` cut to its last num_tokens rows ([IMG0]..[IMG7])
      decision_model.pth.tar   {'state_dict': {'1.weight', '1.bias'}}: Dropout then Linear(D, 2), optional

Independent of the project (`model`, `fromage_bench`): torch, transformers, tokenizers, and the FROMAGe writer's
tokenizer / backbone helpers (`tiny_release`), which are themselves independent. Deterministic per seed.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from .tiny_release import CLIP_HIDDEN, LM_HIDDEN, TRAINED_STD, _write_clip, _write_lm, _write_tokenizer

NUM_TOKENS = 8
RET_EMB_DIM = 16
GEN_EMB_DIM = 24
GEN_MAPPER_WIDTH = 16  # GILL's is 512; the architecture (4+4 layers, 4 heads, 77 queries) is otherwise the same
NUM_CLIP_TOKENS = 77
OPT_EXTRA_ROWS = 7  # OPT-6.7B has 7 more embedding rows than tokens


def _img_token_ids(opt_dir: Path) -> tuple[list[int], int]:
    """[IMG0..7] ids and len(tokenizer) after GILL's tokenizer set-up (cls first, then the [IMG] tokens)."""
    from transformers import GPT2Tokenizer

    tok = GPT2Tokenizer.from_pretrained(str(opt_dir), local_files_only=True)
    tok.add_special_tokens({"cls_token": "<|image|>"})
    ids = []
    for i in range(NUM_TOKENS):
        tok.add_tokens(f"[IMG{i}]")
        one = tok(f"[IMG{i}]", add_special_tokens=False).input_ids
        assert len(one) == 1, one
        ids.append(one[0])
    return ids, len(tok)


def _gen_mapper_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """GILL's gill_mapper TextFcLayer (fc, nn.Transformer, model, query_embs) at a small width, seeded."""
    width = GEN_MAPPER_WIDTH
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    with warnings.catch_warnings():  # torch notes that norm_first disables its nested-tensor fast path
        warnings.simplefilter("ignore", UserWarning)
        mapper = _gen_mapper(width)
    state = {f"model.gen_text_hidden_fcs.0.{k}": v.detach().clone() for k, v in mapper.state_dict().items()}
    state["model.gen_text_hidden_fcs.0.query_embs"] = torch.randn(1, NUM_CLIP_TOKENS, width, generator=gen)
    return state


def _gen_mapper(width: int) -> nn.ModuleDict:
    return nn.ModuleDict({
        "fc": nn.Linear(LM_HIDDEN, width),
        "tfm": nn.Transformer(batch_first=True, norm_first=True, d_model=width, num_encoder_layers=4,
                              num_decoder_layers=4, dim_feedforward=width * 4, dropout=0.0, nhead=4),
        "model": nn.Linear(width, GEN_EMB_DIM),
    })


def _trained_state_dict(seed: int, n_visual_tokens: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(40_000 + seed)

    def rnd(*shape: int) -> torch.Tensor:
        return TRAINED_STD * torch.randn(*shape, generator=gen)

    sd = {
        "model.logit_scale": torch.ones([]) * float(math.log(1 / 0.07)),
        "model.visual_embeddings.weight": rnd(LM_HIDDEN * n_visual_tokens, CLIP_HIDDEN),
        "model.visual_embeddings.bias": rnd(LM_HIDDEN * n_visual_tokens),
        "model.visual_fc.weight": rnd(RET_EMB_DIM, CLIP_HIDDEN),
        "model.visual_fc.bias": rnd(RET_EMB_DIM),
        "model.ret_text_hidden_fcs.0.model.weight": rnd(RET_EMB_DIM, LM_HIDDEN),
        "model.ret_text_hidden_fcs.0.model.bias": rnd(RET_EMB_DIM),
        "model.input_embeddings.weight": rnd(NUM_TOKENS, LM_HIDDEN),
    }
    sd.update(_gen_mapper_state(gen))
    return dict(sorted(sd.items()))


def write_tiny_gill_release_dir(out_dir, seed: int = 0, n_visual_tokens: int = 4, *, decision_model: bool = True,
                                ddp_prefix: bool = False) -> Path:
    """Write a tiny GILL release directory into ``out_dir`` and return its path. ``ddp_prefix`` writes the
    checkpoint keys as an unpruned DistributedDataParallel run has them (``module.model...``)."""
    out = Path(out_dir)
    opt_dir, clip_dir = out / "opt", out / "clip"
    opt_dir.mkdir(parents=True, exist_ok=True)
    clip_dir.mkdir(parents=True, exist_ok=True)

    base_vocab = _write_tokenizer(opt_dir, seed)
    img_ids, tok_len = _img_token_ids(opt_dir)
    assert tok_len == base_vocab + 1 + NUM_TOKENS, (tok_len, base_vocab)
    lm_rows = base_vocab + OPT_EXTRA_ROWS
    assert lm_rows < tok_len  # the loader grows the matrix
    _write_lm(opt_dir, lm_rows, seed)
    _write_clip(clip_dir, seed)

    model_args = {
        "opt_version": "opt",
        "freeze_lm": True,
        "visual_encoder": "clip",
        "freeze_vm": True,
        "n_visual_tokens": int(n_visual_tokens),
        "ret_emb_dim": RET_EMB_DIM,
        "gen_emb_dim": GEN_EMB_DIM,
        "text_emb_layers": [-1],
        "text_fc_mode": "gill_mapper",
        "ret_text_fc_mode": "linear",
        "num_tokens": NUM_TOKENS,
        "num_clip_tokens": NUM_CLIP_TOKENS,
        "share_ret_gen": True,
        "norm_image_embed": "none",
        "retrieval_token_idx": img_ids,
        "gen_token_idx": img_ids,
        "unused_future_key": [1, 2],
    }
    (out / "model_args.json").write_text(json.dumps(model_args, indent=4) + "\n")

    state = _trained_state_dict(seed, n_visual_tokens)
    if ddp_prefix:
        state = {"module." + k: v for k, v in state.items()}
    torch.save({"state_dict": state}, str(out / "pretrained_ckpt.pth.tar"))
    if decision_model:
        gen = torch.Generator().manual_seed(50_000 + seed)
        decision = {"1.weight": TRAINED_STD * torch.randn(2, LM_HIDDEN, generator=gen),
                    "1.bias": TRAINED_STD * torch.randn(2, generator=gen)}
        torch.save({"state_dict": decision}, str(out / "decision_model.pth.tar"))
    return out
