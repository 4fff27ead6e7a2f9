"""Independent re-implementation of the ORIGINAL FROMAGe inference behaviour.

``OriginalStyleFromage`` reproduces what ``fromage.models.load_fromage`` +
``Fromage.generate_for_images_and_texts`` / ``Fromage.get_log_lik_scores`` of
kohjingyu/fromage compute, *including their quirks*, in fp32 on the CPU and
without a KV cache.  It is written from a reading of that code's behaviour, not
copied, and it imports nothing from the project packages (``model``,
``fromage_bench``): it is the yardstick those packages are compared against.

Behaviour reproduced (see /work/shared/spec/fromage-reference.md):

* tokenizer: ``GPT2Tokenizer`` of the LM dir, pad = eos, cls ``<|image|>`` added as a
  special token, ``[RET]`` added as a normal token; its id is recomputed (the
  value stored in ``model_args.json`` is ignored, as the original does); text is
  split on ``[RET]`` and the whitespace on both sides of it stripped, as the
  original's transformers 4.21 did for a plain added token (``tokenize_as_421``);
* LM ``resize_token_embeddings(len(tokenizer))``; the checkpoint's trained tensors
  loaded non-strictly under the original's module names; the ``(1, D)``
  ``ret_input_embeddings.weight`` squeezed and copied into the input-embedding row
  of ``[RET]`` (OPT ties the output head, so the head row changes too);
* images, as the API prepares them: ``img.convert('RGB')`` handed to the CLIP image
  processor as it is (shortest edge to 224, centre crop); the evaluation scripts'
  way (``img.resize((224, 224))`` first, then ``.convert('RGB')``, then the
  processor) is ``squashed_pixel_values``; CLIP ``pooler_output`` ->
  ``visual_embeddings`` (captioning) or ``visual_fc`` (retrieval);
* prompts: every string tokenised with special tokens, the BOS kept only for the
  first string;
* ``num_words == 0``: one forward pass; ``[RET]`` positions are searched in the
  text-only ids but used to index the full (images + text) sequence;
* ``num_words > 0``: greedy / top-p decoding re-running the whole sequence at each
  step, ``[RET]`` logit multiplied by ``ret_scale_factor`` (``min_word_tokens`` 0),
  truncation at the first newline only if it is not the first generated token,
  then ``truncate_caption``;
* ``get_log_lik_scores``: minus the mean Hugging Face (shifted) LM loss with image
  positions labelled -100.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

RET_TOKEN = "[RET]"
IMAGE_TOKEN = "<|image|>"
IMAGE_SIZE = 224

# Defaults of the original's argument class, used when model_args.json lacks a key.
_ARG_DEFAULTS: dict[str, Any] = {
    "n_visual_tokens": 1,
    "image_embed_dropout_prob": 0.0,
    "text_embed_dropout_prob": 0.0,
    "shared_emb_dim": 256,
    "text_emb_layers": [-1],
}


def truncate_caption(caption: str) -> str:
    """The original's caption clean-up: strip newlines at both ends, then cut after
    the first newline, or (when there is none) after the first period."""
    caption = caption.strip("\n")
    cut = caption.find("\n") + 1
    if cut <= 0:
        cut = caption.find(".") + 1
    return caption[:cut] if cut > 0 else caption


def squash_image(img: Image.Image) -> Image.Image:
    """The original evaluation scripts' loader: resize to 224x224 (Pillow's default resampling for the
    image's own mode), and only then convert to RGB."""
    resized = img.resize((IMAGE_SIZE, IMAGE_SIZE))
    return resized.convert("RGB")


def _resolve_backbone(model_dir: Path, name: str) -> str:
    candidate = Path(name)
    if not candidate.is_absolute():
        candidate = model_dir / candidate
    if not candidate.is_dir():
        raise ValueError(
            f"backbone {name!r} is not a local directory (looked at {candidate}); "
            "pass opt_dir= / clip_dir= explicitly")
    return str(candidate)



def tokenize_as_421(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids as transformers 4.21's slow ``tokenize`` gave them: the text split on ``[RET]``; since ``[RET]``
    was added as a plain string (not an ``AddedToken`` with flags of its own), the whitespace of its neighbours is
    stripped, right and left; each piece BPE-tokenised alone; BOS first with special tokens."""
    pieces = re.split(f"({re.escape(RET_TOKEN)})", text)
    for i, piece in enumerate(pieces):
        if piece == RET_TOKEN:
            if i > 0:
                pieces[i - 1] = pieces[i - 1].rstrip()
            if i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
    ret_id = tokenizer.convert_tokens_to_ids(RET_TOKEN)
    ids = [tokenizer.bos_token_id] if add_special_tokens else []
    for piece in pieces:
        if piece == RET_TOKEN:
            ids.append(ret_id)
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False).input_ids
    return ids


class _FromageCore(nn.Module):
    """Holds the modules under the same attribute names as the original, so that the
    released state_dict keys (``model.visual_fc.weight`` ...) load unchanged."""

    def __init__(self, lm: nn.Module, visual_model: nn.Module, args: dict[str, Any]):
        super().__init__()
        self.args = args
        self.lm = lm
        self.input_embeddings = lm.get_input_embeddings()
        self.visual_model = visual_model
        self.logit_scale = nn.Parameter(torch.ones([]) * float(math.log(1 / 0.07)))

        lm_cfg = lm.config
        n_layers = lm_cfg.num_hidden_layers
        shared = args["shared_emb_dim"]
        if shared is None:
            # The original builds no projection then and its inference path fails.
            raise NotImplementedError("shared_emb_dim=None is not supported")
        self.text_hidden_fcs = nn.ModuleList()
        for layer in args["text_emb_layers"]:
            if layer in (-1, n_layers):
                in_dim = lm_cfg.word_embed_proj_dim
            elif layer < n_layers:
                in_dim = lm_cfg.hidden_size
            else:
                raise ValueError(f"text_emb_layers entry {layer} exceeds {n_layers} layers")
            self.text_hidden_fcs.append(nn.Sequential(
                nn.Linear(in_dim, shared), nn.Dropout(args["text_embed_dropout_prob"])))

        vis_dim = visual_model.config.hidden_size
        self.visual_embeddings = nn.Linear(
            vis_dim, self.input_embeddings.embedding_dim * args["n_visual_tokens"])
        self.visual_fc = nn.Linear(vis_dim, shared)
        self.image_dropout = nn.Dropout(args["image_embed_dropout_prob"])


class OriginalStyleFromage(nn.Module):
    """fp32 CPU re-implementation of the original FROMAGe inference API.

    ``emb_matrix`` (optional, (N, shared_emb_dim) raw retrieval embeddings) plays the
    role of the precomputed CC3M set: it is normalised and multiplied by
    ``exp(logit_scale)`` as the original loader does.  ``path_array`` (optional)
    names its rows; without it the retrieval results are row indices.
    """

    def __init__(self, model_dir, *, opt_dir=None, clip_dir=None,
                 emb_matrix: torch.Tensor | None = None,
                 path_array: Sequence[str] | None = None,
                 attn_implementation: str = "eager"):
        super().__init__()
        from transformers import CLIPVisionModel, GPT2Tokenizer, OPTForCausalLM
        try:
            from transformers import CLIPImageProcessorPil
        except ImportError:  # transformers before the split into image-processing backends
            from transformers import CLIPImageProcessor as CLIPImageProcessorPil

        self.model_dir = Path(model_dir)
        raw_args = json.loads((self.model_dir / "model_args.json").read_text())
        args = dict(_ARG_DEFAULTS)
        args.update(raw_args)  # unknown keys are simply carried along
        self.raw_model_args = raw_args

        lm_path = str(opt_dir) if opt_dir is not None else _resolve_backbone(
            self.model_dir, args["opt_version"])
        vm_path = str(clip_dir) if clip_dir is not None else _resolve_backbone(
            self.model_dir, args["visual_encoder"])

        tok = GPT2Tokenizer.from_pretrained(lm_path, local_files_only=True)
        tok.pad_token = tok.eos_token
        tok.add_special_tokens({"cls_token": IMAGE_TOKEN})
        tok.add_tokens(RET_TOKEN)
        ret_ids = tok(RET_TOKEN, add_special_tokens=False).input_ids
        if len(ret_ids) != 1:
            raise ValueError(f"[RET] does not map to one id: {ret_ids}")
        self.tokenizer = tok
        self.retrieval_token_idx = ret_ids[0]
        args["retrieval_token_idx"] = self.retrieval_token_idx
        self.args = args

        lm = OPTForCausalLM.from_pretrained(
            lm_path, local_files_only=True, dtype=torch.float32,
            attn_implementation=attn_implementation)
        lm.resize_token_embeddings(len(tok))
        vm = CLIPVisionModel.from_pretrained(
            vm_path, local_files_only=True, dtype=torch.float32,
            attn_implementation=attn_implementation)
        self.image_processor = CLIPImageProcessorPil.from_pretrained(vm_path, local_files_only=True)

        self.model = _FromageCore(lm, vm, args)
        self.to(torch.float32)

        ckpt = torch.load(str(self.model_dir / "pretrained_ckpt.pth.tar"),
                          map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
        self.load_report = self.load_state_dict(state, strict=False)
        with torch.no_grad():
            ret_row = state["ret_input_embeddings.weight"].squeeze().to(torch.float32)
            self.model.input_embeddings.weight[self.retrieval_token_idx, :].copy_(ret_row)

        self.path_array = list(path_array) if path_array is not None else None
        self.emb_matrix = None
        if emb_matrix is not None:
            em = torch.as_tensor(emb_matrix, dtype=torch.float32)
            em = em / em.norm(dim=1, keepdim=True)
            self.emb_matrix = self.model.logit_scale.exp().detach() * em
        self.eval()

    # ------------------------------------------------------------------ basics
    @property
    def lm(self) -> nn.Module:
        return self.model.lm

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.model.input_embeddings

    @property
    def n_visual_tokens(self) -> int:
        return int(self.args["n_visual_tokens"])

    def pixel_values(self, img: Image.Image) -> torch.Tensor:
        """(3, 224, 224) fp32 CLIP input of one PIL image as the API makes it: RGB, then the
        processor's own shortest-edge resize and centre crop."""
        rgb = img.convert("RGB")
        out = self.image_processor(rgb, return_tensors="pt").pixel_values[0]
        return out.to(torch.float32)

    def squashed_pixel_values(self, img: Image.Image) -> torch.Tensor:
        """(3, 224, 224) fp32 CLIP input as the VIST / VisDial scripts make it (`squash_image`)."""
        out = self.image_processor(squash_image(img), return_tensors="pt").pixel_values[0]
        return out.to(torch.float32)

    @torch.no_grad()
    def get_visual_embs(self, pixel_values: torch.Tensor, mode: str = "captioning") -> torch.Tensor:
        """captioning: (N, n_visual_tokens, D_lm); retrieval: (N, 1, shared_emb_dim)."""
        if mode not in ("captioning", "retrieval"):
            raise ValueError(f"unknown mode {mode!r}")
        pooled = self.model.visual_model(pixel_values).pooler_output
        if mode == "captioning":
            embs = self.model.visual_embeddings(pooled)
            embs = embs.reshape(embs.shape[0], self.n_visual_tokens, -1)
        else:
            embs = self.model.visual_fc(pooled)
            embs = embs.reshape(embs.shape[0], 1, -1)
        return self.model.image_dropout(embs)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[Any]):
        """Returns (input_embs (1, L, D), text_ids (1, T_text), labels (1, L)).

        ``text_ids`` is the concatenation of the text pieces only (what the original
        calls input_ids in generate_for_images_and_texts); ``labels`` is the full
        sequence with -100 at image positions (get_log_lik_scores' labels).
        """
        embs, text_ids, labels = [], [], []
        first_text = True
        for p in prompts:
            if isinstance(p, Image.Image):
                pv = self.pixel_values(p)[None, ...]
                v = self.get_visual_embs(pv, mode="captioning")
                embs.append(v)
                labels.append(torch.full(v.shape[:2], -100, dtype=torch.long))
            elif isinstance(p, str):
                ids = torch.tensor([tokenize_as_421(self.tokenizer, p)])
                if first_text:
                    first_text = False
                else:
                    ids = ids[:, 1:]
                embs.append(self.input_embeddings(ids))
                text_ids.append(ids)
                labels.append(ids)
            else:
                raise ValueError(f"prompt items must be PIL images or str, got {type(p)}")
        if not text_ids:
            raise ValueError("the original requires at least one text prompt")
        return torch.cat(embs, dim=1), torch.cat(text_ids, dim=1), torch.cat(labels, dim=1)

    def _text_embeddings(self, hidden_states) -> torch.Tensor:
        """Sum over text_emb_layers of text_hidden_fcs(hidden), L2-normalised: (N, T, E)."""
        parts = [fc(hidden_states[layer])
                 for layer, fc in zip(self.args["text_emb_layers"], self.model.text_hidden_fcs)]
        summed = torch.stack(parts, dim=-1).sum(dim=-1)
        return summed / summed.norm(dim=-1, keepdim=True)

    # --------------------------------------------------------- num_words == 0
    @torch.no_grad()
    def ret_embeddings_num_words0(self, prompts: Sequence[Any]) -> torch.Tensor:
        """(L, shared_emb_dim) normalised embeddings of every position of the single
        forward pass that num_words=0 runs (L includes the visual tokens)."""
        input_embs, _, _ = self.encode_prompts(prompts)
        out = self.lm(inputs_embeds=input_embs, use_cache=False, output_hidden_states=True)
        return self._text_embeddings(out.hidden_states)[0]

    @torch.no_grad()
    def original_ret_index(self, prompts: Sequence[Any]) -> int | None:
        """Index the original reads for the first [RET] when num_words=0: the position
        of [RET] in the TEXT-ONLY ids (wrong when images precede the text). None if no
        [RET] is in the prompts."""
        _, text_ids, _ = self.encode_prompts(prompts)
        hits = (text_ids[0] == self.retrieval_token_idx).nonzero().flatten().tolist()
        return hits[0] if hits else None

    # ----------------------------------------------------------- decoding
    @torch.no_grad()
    def _decode(self, embeddings: torch.Tensor, max_len: int, temperature: float = 0.0,
                top_p: float = 1.0, min_word_tokens: int = 0, ret_scale_factor: float = 1.0,
                filter_value: float = -float("inf")):
        """The original decoding loop (no cache). Returns (ids (N, max_len),
        per-step normalised embeddings list, per-step last-position logits list)."""
        generated = None
        step_embs, step_logits = [], []
        for step in range(max_len):
            out = self.lm(inputs_embeds=embeddings, use_cache=False, output_hidden_states=True)
            step_embs.append(self._text_embeddings(out.hidden_states))
            logits = out.logits[:, -1, :].clone()
            step_logits.append(logits)
            r = self.retrieval_token_idx
            if step < min_word_tokens:
                logits[:, r] = filter_value
            else:
                logits[:, r] = logits[:, r] * ret_scale_factor
            if temperature == 0.0:
                if top_p != 1.0:
                    raise ValueError("top_p cannot be set if temperature is 0 (greedy decoding).")
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_p < 1.0:
                    order_vals, order_idx = logits.sort(dim=-1, descending=True)
                    cum = F.softmax(order_vals, dim=-1).cumsum(dim=-1)
                    drop = cum > top_p
                    drop[..., 1:] = drop[..., :-1].clone()
                    drop[..., 0] = False
                    for row in range(order_idx.shape[0]):
                        logits[row, order_idx[row, drop[row]]] = filter_value
                # The original samples from exp(logits) (unnormalised weights).
                nxt = torch.multinomial(logits.exp(), 1)
            nxt = nxt.long()
            generated = nxt if generated is None else torch.cat([generated, nxt], dim=-1)
            embeddings = torch.cat([embeddings, self.input_embeddings(nxt)], dim=1)
        return generated, step_embs, step_logits

    @torch.no_grad()
    def greedy_tokens(self, prompts: Sequence[Any], num_words: int,
                      ret_scale_factor: float = 1.0) -> list[int]:
        """Raw greedily generated ids (before any newline truncation)."""
        input_embs, _, _ = self.encode_prompts(prompts)
        ids, _, _ = self._decode(input_embs, num_words, temperature=0.0, top_p=1.0,
                                 min_word_tokens=0, ret_scale_factor=ret_scale_factor)
        return [int(t) for t in ids[0].tolist()]

    @property
    def newline_token_id(self) -> int:
        return self.tokenizer("\n", add_special_tokens=False).input_ids[0]

    @torch.no_grad()
    def generation_internals(self, prompts: Sequence[Any], num_words: int = 0,
                             ret_scale_factor: float = 1.0, top_p: float = 1.0,
                             temperature: float = 0.0) -> dict[str, torch.Tensor]:
        """What generate_for_images_and_texts works on before building its outputs:
        ``generated_ids`` (1, T) after newline truncation (the text-only prompt ids
        when num_words=0) and ``embeddings`` (1, T', E) that [RET] positions index."""
        input_embs, text_ids, _ = self.encode_prompts(prompts)
        if num_words == 0:
            out = self.lm(inputs_embeds=input_embs, use_cache=False, output_hidden_states=True)
            return {"generated_ids": text_ids, "raw_ids": text_ids,
                    "embeddings": self._text_embeddings(out.hidden_states)}
        if num_words < 0:
            raise ValueError("num_words must be >= 0")
        ids, step_embs, _ = self._decode(input_embs, num_words, temperature=temperature,
                                         top_p=top_p, min_word_tokens=0,
                                         ret_scale_factor=ret_scale_factor)
        raw = ids
        # Last forward pass, positions after the prompt: one fewer than generated ids.
        embs = step_embs[-1][:, input_embs.shape[1]:]
        nl = self.newline_token_id
        cut = 0
        for j in range(ids.shape[1]):
            if ids[0, j] == nl:
                cut = j
                break
        if cut > 0:  # a newline as the very first token is NOT truncated (quirk)
            ids = ids[:, :cut]
            embs = embs[:, :cut]
        return {"generated_ids": ids, "raw_ids": raw, "embeddings": embs}

    @torch.no_grad()
    def generate_for_images_and_texts(self, prompts: Sequence[Any], num_words: int = 0,
                                      ret_scale_factor: float = 1.0, top_p: float = 1.0,
                                      temperature: float = 0.0, max_num_rets: int = 1,
                                      max_img_per_ret: int = 1) -> list:
        """The original's interleaved output: str pieces, and after each piece that
        ends in ' [RET]' a list of retrieved items (paths if ``path_array`` was given,
        else row indices of ``emb_matrix``; an empty list without ``emb_matrix``)."""
        st = self.generation_internals(prompts, num_words, ret_scale_factor, top_p, temperature)
        ids, embs = st["generated_ids"], st["embeddings"]
        ret_positions = (ids[0] == self.retrieval_token_idx).nonzero().flatten().tolist()
        ret_positions = ret_positions[:max_num_rets]
        outputs: list = []
        if not ret_positions:
            text = self.tokenizer.batch_decode(ids, skip_special_tokens=True)[0]
            outputs.append(truncate_caption(text))
            return outputs
        seen: list[int] = []
        start = 0
        for pos in ret_positions:
            ret_emb = embs[:, pos, :]  # IndexError for a final [RET], as in the original
            found: list = []
            if self.emb_matrix is not None:
                scores = self.emb_matrix @ ret_emb.T  # (N_images, 1)
                for s in seen:
                    scores[s, :] -= 1000
                _, top = scores.squeeze().topk(max_img_per_ret + 3)
                for idx in top.tolist():
                    seen.append(idx)  # every candidate "loads" here
                    found.append(self.path_array[idx] if self.path_array is not None else idx)
                    if len(found) == max_img_per_ret:
                        break
            text = self.tokenizer.batch_decode(ids[:, start:pos], skip_special_tokens=True)[0]
            start = pos + 1
            outputs.append(truncate_caption(text) + " [RET]")
            outputs.append(found)
        return outputs

    @torch.no_grad()
    def generate_text(self, prompts: Sequence[Any], num_words: int,
                      ret_scale_factor: float = 1.0) -> str:
        """Greedy caption as the original reports it: the newline-truncated decode after
        truncate_caption.  If [RET] tokens are produced, the str pieces of
        generate_for_images_and_texts joined with '' (text after the last handled
        [RET] is dropped, as in the original)."""
        outs = self.generate_for_images_and_texts(prompts, num_words=num_words,
                                                  ret_scale_factor=ret_scale_factor)
        return "".join(o for o in outs if isinstance(o, str))

    # ------------------------------------------------------------ scoring
    @torch.no_grad()
    def get_log_lik_scores(self, prompts: Sequence[Any]) -> float:
        """Minus the mean shifted HF LM loss over the text labels (images -> -100)."""
        input_embs, _, labels = self.encode_prompts(prompts)
        out = self.lm(inputs_embeds=input_embs, labels=labels, use_cache=False,
                      output_hidden_states=True)
        return -out.loss.item()

    @torch.no_grad()
    def retrieval_image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, shared_emb_dim) raw (unnormalised) visual_fc embeddings of images."""
        pv = torch.stack([self.pixel_values(im) for im in images])
        return self.get_visual_embs(pv, mode="retrieval")[:, 0, :]


def load_original_style(model_dir, **kwargs) -> OriginalStyleFromage:
    """Convenience constructor, named after the original's ``load_fromage``."""
    return OriginalStyleFromage(model_dir, **kwargs)


__all__ = ["OriginalStyleFromage", "load_original_style", "truncate_caption", "squash_image", "tokenize_as_421",
           "RET_TOKEN", "IMAGE_TOKEN"]
