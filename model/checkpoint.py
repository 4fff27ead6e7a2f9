"""The released checkpoint `pretrained_ckpt.pth.tar`: only the trained tensors, under 'state_dict'.

Keys: model.logit_scale, model.visual_embeddings.*, model.visual_fc.*, model.text_hidden_fcs.{i}.0.*
and ret_input_embeddings.weight (the `[RET]` input-embedding row, shape (1, D)).
"""
from __future__ import annotations

import json
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from .args import MODEL_ARGS_FILE, ModelArgs
from .errors import FromageInputError
from .files import atomic_write, atomic_write_text
from .fromage import FromageModel

CHECKPOINT_FILE = "pretrained_ckpt.pth.tar"
RET_ROW_KEY = "ret_input_embeddings.weight"


def trained_keys(model: FromageModel) -> list[str]:
    """The checkpoint keys a model with these arguments needs."""
    keys = ["model.logit_scale", "model.visual_embeddings.weight", "model.visual_embeddings.bias",
            "model.visual_fc.weight", "model.visual_fc.bias"]
    for i in range(len(model.text_hidden_fcs)):
        keys += [f"model.text_hidden_fcs.{i}.0.weight", f"model.text_hidden_fcs.{i}.0.bias"]
    return keys + [RET_ROW_KEY]


def _trained_parameters(model: FromageModel) -> dict[str, torch.Tensor]:
    return {f"model.{name}": p for name, p in model.named_parameters() if not name.startswith(("lm.", "visual_model."))}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load with weights_only=True: a checkpoint that needs arbitrary unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise FromageInputError(path, "missing", "a FROMAGe model directory holds model_args.json and pretrained_ckpt.pth.tar")
    if not zipfile.is_zipfile(path):
        raise FromageInputError(path, "not a readable torch checkpoint (not a torch.save zip archive)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "arbitrary objects")
        raise FromageInputError(path, f"refused: the checkpoint holds more than tensors ({detail}); "
                                "it is never unpickled unrestricted") from None
    except Exception as err:  # truncated archive, missing records, ...
        raise FromageInputError(path, f"not a readable torch checkpoint: {err}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise FromageInputError(path, "expected a dict with a 'state_dict' entry")
    return checkpoint["state_dict"]


def apply_trained_weights(model: FromageModel, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy the trained tensors in (the frozen backbones are left alone: a non-strict load), and write the
    `[RET]` row into the LM's input embeddings, as the original loader does."""
    own = _trained_parameters(model)
    missing = [k for k in trained_keys(model) if k not in state_dict]
    if missing:
        raise FromageInputError(source, f"checkpoint lacks {', '.join(missing)}",
                                "is this a FROMAGe pretrained_ckpt.pth.tar, and does model_args.json match it?")
    with torch.no_grad():
        for key in trained_keys(model):
            value = state_dict[key]
            if key == RET_ROW_KEY:
                target = model.input_embeddings.weight[model.retrieval_token_idx]
                value = value.reshape(-1)
            else:
                target = own[key]
            if tuple(value.shape) != tuple(target.shape):
                raise FromageInputError(source, f"{key} has shape {tuple(value.shape)} but the model built from "
                                        f"model_args.json expects {tuple(target.shape)}",
                                        "check n_visual_tokens, shared_emb_dim and opt_version")
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def trained_state_dict(model: FromageModel, ret_row: torch.Tensor | None = None) -> "OrderedDict[str, torch.Tensor]":
    """The pruned release state dict of a model (what `apply_trained_weights` reads back). `ret_row`: the [RET]
    row to write instead of the embedding matrix's (training keeps it in fp32 when the matrix is bf16)."""
    own = _trained_parameters(model)
    out = OrderedDict()
    for key in trained_keys(model):
        if key == RET_ROW_KEY:
            row = model.input_embeddings.weight[model.retrieval_token_idx] if ret_row is None else ret_row
            out[key] = row.detach().float().cpu().reshape(1, -1).clone()
        else:
            out[key] = own[key].detach().float().cpu().clone()
    return out


def save_release(model: FromageModel, out_dir: str | Path, args: ModelArgs | None = None,
                 ret_row: torch.Tensor | None = None) -> Path:
    """Write `model_args.json` + `pretrained_ckpt.pth.tar` (the backbones are referenced, not copied)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = args or model.args
    raw = args.to_dict()
    raw["retrieval_token_idx"] = model.retrieval_token_idx
    state = {"state_dict": trained_state_dict(model, ret_row)}
    atomic_write(out_dir / CHECKPOINT_FILE, lambda f: torch.save(state, f))
    atomic_write_text(out_dir / MODEL_ARGS_FILE, json.dumps(raw, indent=4) + "\n")
    return out_dir
