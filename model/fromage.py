"""FromageModel: the frozen OPT + CLIP backbones and the trained maps that join them.

Reads top to bottom: construction, then the two image mappings, then the text-to-retrieval-space map.
The inference procedures (prompts, generation, scoring, retrieval) live in their own modules and take
a FromageModel.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .args import ModelArgs


class FromageModel(nn.Module):
    """Mirrors the released model's module names, so the pruned checkpoint's keys load as they are."""

    def __init__(self, args: ModelArgs, tokenizer, lm, visual_model, feature_extractor, dtype: torch.dtype):
        super().__init__()
        self.args = args
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.lm = lm
        self.visual_model = visual_model
        self.image_token = tokenizer.cls_token_id
        self.retrieval_token_idx = tokenizer.convert_tokens_to_ids("[RET]")

        lm_dim = lm.config.hidden_size
        out_dim = lm.config.word_embed_proj_dim
        vision_dim = visual_model.config.hidden_size
        device = lm.get_input_embeddings().weight.device

        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device, dtype=dtype))
        self.text_hidden_fcs = nn.ModuleList(
            nn.Sequential(nn.Linear(self._text_layer_dim(i, lm_dim, out_dim), args.shared_emb_dim),
                          nn.Dropout(args.text_embed_dropout_prob))
            for i in args.text_emb_layers)
        self.visual_embeddings = nn.Linear(vision_dim, out_dim * args.n_visual_tokens)
        self.visual_fc = nn.Linear(vision_dim, args.shared_emb_dim)
        self.image_dropout = nn.Dropout(args.image_embed_dropout_prob)
        for trained in (self.text_hidden_fcs, self.visual_embeddings, self.visual_fc):
            trained.to(device=device, dtype=dtype)

    def _text_layer_dim(self, layer: int, hidden: int, projected: int) -> int:
        n_layers = self.lm.config.num_hidden_layers
        if layer in (-1, n_layers):
            return projected  # OPT's last hidden state is after project_out
        if -n_layers <= layer < n_layers:
            return hidden
        raise ValueError(f"text_emb_layers asks for layer {layer} but the LM has {n_layers} layers")

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the trained maps (and of everything that is not an int8 weight)."""
        return self.logit_scale.dtype

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.input_embeddings.weight.dtype

    # -- images ---------------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled output (N, vision_dim): both mappings derive from it, so callers may cache it."""
        vision_dtype = next(self.visual_model.parameters()).dtype
        outputs = self.visual_model(pixel_values.to(device=self.device, dtype=vision_dtype))
        return outputs.pooler_output

    def project_visual(self, features: torch.Tensor, mode: str = "captioning") -> torch.Tensor:
        """captioning: (N, n_visual_tokens, lm_dim) LM input tokens; retrieval: (N, 1, shared_dim)."""
        features = features.to(self.dtype)
        if mode == "captioning":
            embs = self.visual_embeddings(features).reshape(features.shape[0], self.args.n_visual_tokens, -1)
        elif mode == "retrieval":
            embs = self.visual_fc(features).reshape(features.shape[0], 1, -1)
        else:
            raise ValueError(f'mode must be "captioning" or "retrieval", got {mode!r}')
        return self.image_dropout(embs)

    def get_visual_embs(self, pixel_values: torch.Tensor, mode: str = "captioning") -> torch.Tensor:
        """The original API: pixel values -> visual embeddings in the given mode."""
        return self.project_visual(self.vision_features(pixel_values), mode)

    # -- text -----------------------------------------------------------------------------------------
    def retrieval_space(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Sum of text_hidden_fcs over text_emb_layers, NOT normalised: (..., T, shared_dim)."""
        mapped = [fc(hidden_states[layer].to(self.dtype)) for layer, fc in zip(self.args.text_emb_layers, self.text_hidden_fcs)]
        return torch.stack(mapped, dim=-1).sum(dim=-1)

    def text_hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The LM's hidden states (embeddings, then each layer) for input embeddings, without the LM head:
        retrieval reads hidden states only, and the head's (T, vocabulary) logits cost as much as the layers."""
        out = self.lm.model.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False, output_hidden_states=True)
        return out.hidden_states

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.input_embeddings(token_ids.to(self.device))
