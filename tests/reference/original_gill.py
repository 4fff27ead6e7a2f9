"""Independent re-implementation of the ORIGINAL GILL retrieval path (kohjingyu/gill), fp32 on the CPU.

``OriginalStyleGill(model_dir)`` does what ``gill.models.load_gill`` (without Stable Diffusion and without the
CC3M embedding pickles) and the retrieval mode of ``GILLModel.forward`` compute, written from a reading of that
code's behaviour, not copied; it imports nothing from the project packages (``model``, ``fromage_bench``).

* model_args.json read as it is (GILL turns it into a namedtuple: every key it reads must be present);
* tokenizer: ``GPT2Tokenizer`` of the LM dir (``use_fast=False``), pad = eos only if the tokenizer has no pad,
  cls ``<|image|>`` added as a special token, then ``[IMG0]``..``[IMG{n-1}]`` added one by one as plain tokens
  (each must be one id); the ids in model_args.json are ignored (recomputed, as GILL does). Text is split on the
  ``[IMG]`` tokens and the whitespace on both sides stripped, as GILL's transformers 4.30 slow tokenizer did for
  plain added tokens (``tokenize_as_430``);
* LM ``resize_token_embeddings(len(tokenizer))``; the checkpoint's keys with 'module.' removed;
  ``model.input_embeddings.weight`` taken out and copied into the LAST ``num_tokens`` rows of the input
  embeddings; the rest loaded non-strictly under GILL's module names (``ret_text_hidden_fcs.0.model``: a
  ``TextFcLayer`` in linear mode). The generation mapper is not built (Stable Diffusion only);
* images: ``img.convert('RGB')`` then the CLIP processor (``get_pixel_values_for_model``); GILL's own VIST /
  VisDial generation scripts' way is ``convert('RGB').resize((224, 224))`` first (``squashed_pixel_values``);
  CLIP ``pooler_output`` -> ``visual_embeddings`` reshaped to (n_visual_tokens, D) or ``visual_fc``;
* prompts as ``generate_for_images_and_texts`` encodes them: each image its captioning tokens, each string
  tokenised with special tokens only for the first (BOS once);
* retrieval embedding as the retrieval training mode: the caption (the prompt's last string) with
  ``[IMG0]...[IMG7]`` appended without a space (``CsvDataset``), the LM's hidden states of the layers in
  ``text_emb_layers`` at the ``num_tokens`` last positions, each through its ``ret_text_hidden_fcs`` (linear on
  every position, then only the first output kept: ``[IMG0]``'s), summed, divided by its norm.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from PIL import Image

IMAGE_TOKEN = "<|image|>"


def img_token_strings(n: int) -> list[str]:
    return [f"[IMG{i}]" for i in range(n)]


def tokenize_as_430(tokenizer, text: str, added: Sequence[str], add_special_tokens: bool) -> list[int]:
    """Ids as transformers 4.30's slow ``tokenize`` gave them for plain added tokens: the text split on them, the
    neighbours' whitespace stripped on both sides, each piece BPE-tokenised alone, BOS first with specials."""
    pieces = re.split("(" + "|".join(re.escape(t) for t in added) + ")", text)
    for i, piece in enumerate(pieces):
        if piece in added:
            if i > 0:
                pieces[i - 1] = pieces[i - 1].rstrip()
            if i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
    ids = [tokenizer.bos_token_id] if add_special_tokens else []
    for piece in pieces:
        if piece in added:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False).input_ids
    return ids


class _TextFcLinear(nn.Module):
    """GILL's TextFcLayer, mode 'linear': a Linear named `model`, then the first `num_output_tokens` outputs."""

    def __init__(self, in_dim: int, out_dim: int, num_output_tokens: int = 1):
        super().__init__()
        self.model = nn.Linear(in_dim, out_dim)
        self.num_output_tokens = num_output_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[:, :self.num_output_tokens, :] if out.shape[1] != self.num_output_tokens else out


class _GillCore(nn.Module):
    def __init__(self, lm: nn.Module, visual_model: nn.Module, args: dict[str, Any]):
        super().__init__()
        self.lm = lm
        self.input_embeddings = lm.get_input_embeddings()
        self.visual_model = visual_model
        n_layers = lm.config.num_hidden_layers
        self.ret_text_hidden_fcs = nn.ModuleList()
        for layer in args["text_emb_layers"]:
            in_dim = lm.config.word_embed_proj_dim if layer in (-1, n_layers) else lm.config.hidden_size
            self.ret_text_hidden_fcs.append(_TextFcLinear(in_dim, args["ret_emb_dim"]))
        hidden = visual_model.config.hidden_size
        self.visual_embeddings = nn.Linear(hidden, self.input_embeddings.embedding_dim * args["n_visual_tokens"])
        self.visual_fc = nn.Linear(hidden, args["ret_emb_dim"])
        self.logit_scale = nn.Parameter(torch.ones([]) * float(math.log(1 / 0.07)))


class OriginalStyleGill(nn.Module):
    def __init__(self, model_dir, attn_implementation: str = "eager"):
        super().__init__()
        from transformers import CLIPVisionModel, GPT2Tokenizer, OPTForCausalLM
        try:
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:
            from transformers import CLIPImageProcessor as Processor

        self.model_dir = Path(model_dir)
        args = json.loads((self.model_dir / "model_args.json").read_text())
        if args.get("ret_text_fc_mode") != "linear":
            raise NotImplementedError("only the released linear retrieval map")
        self.args = args
        self.num_tokens = int(args["num_tokens"])
        lm_path = str(self.model_dir / args["opt_version"])
        vm_path = str(self.model_dir / args["visual_encoder"])

        tok = GPT2Tokenizer.from_pretrained(lm_path, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token_id = tok.eos_token_id
        tok.add_special_tokens({"cls_token": IMAGE_TOKEN})
        self.img_tokens = img_token_strings(self.num_tokens)
        self.img_token_ids = []
        for name in self.img_tokens:
            tok.add_tokens(name)
            ids = tok(name, add_special_tokens=False).input_ids
            assert len(ids) == 1, ids
            self.img_token_ids.append(ids[0])
        self.tokenizer = tok

        lm = OPTForCausalLM.from_pretrained(lm_path, local_files_only=True, dtype=torch.float32,
                                            attn_implementation=attn_implementation)
        lm.resize_token_embeddings(len(tok))
        vm = CLIPVisionModel.from_pretrained(vm_path, local_files_only=True, dtype=torch.float32,
                                             attn_implementation=attn_implementation)
        self.image_processor = Processor.from_pretrained(vm_path, local_files_only=True)
        self.model = _GillCore(lm, vm, args)
        self.to(torch.float32)

        ckpt = torch.load(str(self.model_dir / "pretrained_ckpt.pth.tar"), map_location="cpu", weights_only=True)
        state = {k.replace("module.", ""): v for k, v in ckpt["state_dict"].items()}
        img_rows = state.pop("model.input_embeddings.weight")
        self.load_report = self.load_state_dict(state, strict=False)
        with torch.no_grad():
            self.model.input_embeddings.weight[-self.num_tokens:, :].copy_(img_rows)

        self.decision_model = None
        decision_path = self.model_dir / "decision_model.pth.tar"
        if decision_path.is_file():
            decision = torch.load(str(decision_path), map_location="cpu", weights_only=True)["state_dict"]
            self.decision_model = nn.Sequential(nn.Dropout(0.5), nn.Linear(decision["1.weight"].shape[1], 2))
            self.decision_model.load_state_dict(decision, strict=True)
        self.eval()

    # -- images ---------------------------------------------------------------------------------------------
    def pixel_values(self, img: Image.Image) -> torch.Tensor:
        return self.image_processor(img.convert("RGB"), return_tensors="pt").pixel_values[0].float()

    def squashed_pixel_values(self, img: Image.Image) -> torch.Tensor:
        """GILL's evals/generate_vist_images.py: convert to RGB first, then resize to 224x224."""
        squashed = img.convert("RGB").resize((224, 224))
        return self.image_processor(squashed, return_tensors="pt").pixel_values[0].float()

    @torch.no_grad()
    def get_visual_embs(self, pixel_values: torch.Tensor, mode: str = "captioning") -> torch.Tensor:
        pooled = self.model.visual_model(pixel_values).pooler_output
        if mode == "captioning":
            embs = self.model.visual_embeddings(pooled)
            return embs.reshape(embs.shape[0], int(self.args["n_visual_tokens"]), -1)
        if mode == "retrieval":
            return self.model.visual_fc(pooled).reshape(pooled.shape[0], 1, -1)
        raise ValueError(mode)

    @torch.no_grad()
    def retrieval_image_embeddings(self, images: Sequence[Image.Image], squash: bool = False) -> torch.Tensor:
        prepare = self.squashed_pixel_values if squash else self.pixel_values
        return self.get_visual_embs(torch.stack([prepare(im) for im in images]), "retrieval")[:, 0]

    # -- text -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_embs (1, L, D), labels (1, L) with -100 at image positions)."""
        embs, labels = [], []
        add_bos = True
        for p in prompts:
            if isinstance(p, Image.Image):
                v = self.get_visual_embs(self.pixel_values(p)[None], "captioning")
                embs.append(v)
                labels.append(torch.full(v.shape[:2], -100, dtype=torch.long))
            elif isinstance(p, str):
                ids = torch.tensor([tokenize_as_430(self.tokenizer, p, self.img_tokens, add_bos)])
                add_bos = False
                embs.append(self.model.input_embeddings(ids))
                labels.append(ids)
            else:
                raise ValueError(type(p))
        return torch.cat(embs, dim=1), torch.cat(labels, dim=1)

    @torch.no_grad()
    def retrieval_embedding(self, prompts: Sequence[Any]) -> torch.Tensor:
        """(ret_emb_dim,) normalised: the last string gets all the [IMG] tokens appended."""
        assert isinstance(prompts[-1], str)
        full = list(prompts[:-1]) + [prompts[-1] + "".join(self.img_tokens)]
        input_embs, labels = self.encode_prompts(full)
        assert labels[0, -self.num_tokens:].tolist() == self.img_token_ids
        out = self.model.lm(inputs_embeds=input_embs, use_cache=False, output_hidden_states=True)
        last = input_embs.shape[1] - 1
        parts = []
        for layer, fc in zip(self.args["text_emb_layers"], self.model.ret_text_hidden_fcs):
            span = out.hidden_states[layer][:, last - self.num_tokens + 1:last + 1, :]  # (1, num_tokens, D)
            parts.append(fc(span))
        emb = torch.stack(parts, dim=-1).sum(dim=-1)[:, 0, :]
        return (emb / emb.norm(dim=1, keepdim=True))[0]

    @torch.no_grad()
    def get_log_likelihood_scores(self, prompts: Sequence[Any]) -> float:
        input_embs, labels = self.encode_prompts(prompts)
        out = self.model.lm(inputs_embeds=input_embs, labels=labels, use_cache=False)
        return -out.loss.item()


__all__ = ["OriginalStyleGill", "tokenize_as_430", "img_token_strings"]
