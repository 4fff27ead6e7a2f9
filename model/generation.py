"""Autoregressive decoding with FROMAGe's `[RET]` handling, with or without a KV cache.

Both paths share one loop; they differ only in how the next forward pass sees the past: the cached
path feeds the newest token against the KV cache, the uncached path (what the original code does)
re-encodes the whole sequence. Greedy decoding therefore yields the same tokens either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fromage import FromageModel
from .lm_cache import cache_layers, forward_with_cache, returned_cache
from .static_decode import static_decoder, supports_static

from .prompts import PaddedBatch

STATIC_PATHS = ("static", "graph", "compiled")  # the fixed-size-cache step (model/static_decode.py)
DECODE_PATHS = ("auto", "dynamic", *STATIC_PATHS)


@dataclass
class GenerationOutput:
    token_ids: torch.Tensor       # (B, L) generated ids
    ret_embeddings: torch.Tensor  # (B, L, shared_dim) normalised retrieval-space embedding of each generated token
    lengths: torch.Tensor         # (B,) tokens kept: L, or up to (excluding) the first newline when stopping there

    @property
    def tokens_computed(self) -> int:
        """Tokens the decoder ran a step for: every row at every step, rows already past their newline included.
        The static/graph path always runs `max_new_tokens` steps; the dynamic path stops once every row has
        its newline (with `stop_at_newline`), so the two compute different amounts for the same kept text."""
        return int(self.token_ids.numel())

    @property
    def tokens_kept(self) -> int:
        """Tokens of the answer: each row's `lengths` (up to its first newline when stopping there)."""
        return int(self.lengths.sum())


def newline_token_id(model: FromageModel) -> int:
    return model.tokenizer("\n", add_special_tokens=False).input_ids[0]


def choose_next_token(logits: torch.Tensor, step: int, ret_token: int, *, temperature: float = 0.0, top_p: float = 1.0,
                      min_word_tokens: int = 0, ret_scale_factor: float = 1.0, generator: torch.Generator | None = None,
                      filter_value: float = -float("inf")) -> torch.Tensor:
    """(B, V) last-position logits -> (B,) next token ids, with the original's rules:
    `[RET]` is forbidden for the first `min_word_tokens` steps and its logit multiplied by
    `ret_scale_factor` afterwards; temperature 0 is greedy; otherwise nucleus (top-p) sampling."""
    logits = logits.float().clone()
    if step < min_word_tokens:
        logits[:, ret_token] = filter_value
    else:
        logits[:, ret_token] = logits[:, ret_token] * ret_scale_factor
    if temperature == 0.0:
        if top_p != 1.0:
            raise ValueError("top_p needs temperature > 0 (temperature 0 is greedy decoding)")
        return logits.argmax(dim=-1)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token once the tokens ranked above it already exceed top_p (the first one always stays)
        drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        drop_sorted[:, 1:] = cumulative[:, :-1] > top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, filter_value)
    probs = F.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        # draw where the generator lives: a CPU generator gives the same tokens on any device
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate(model: FromageModel, batch: PaddedBatch, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, min_word_tokens: int = 0, ret_scale_factor: float = 1.0, stop_at_newline: bool = False,
             use_cache: bool = True, generator: torch.Generator | None = None, decode: str = "auto") -> GenerationOutput:
    """Decode up to `max_new_tokens` tokens after a LEFT-padded batch of prompts.

    With the cache, `decode` picks how steps run: "dynamic" (Hugging Face forward with a growing cache),
    "static" (fixed-size cache, our own step), "graph" (static, replayed as a CUDA graph), "compiled" (graph
    on CUDA, static elsewhere, with the layer's element-wise work fused by `torch.compile`; the first call
    compiles) or "auto" (graph on CUDA when the model allows it, else dynamic).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode must be one of {DECODE_PATHS}")
    if decode == "auto":
        decode = "graph" if embeds_device(batch).type == "cuda" and supports_static(model.lm) else "dynamic"
    lm = model.lm
    embeds, mask = batch.embeds, batch.attention_mask
    prompt_lengths = mask.sum(dim=1, keepdim=True)  # (B, 1)
    next_position = prompt_lengths  # position the next token takes
    newline = newline_token_id(model)
    finished = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    lengths = torch.full_like(finished, max_new_tokens, dtype=torch.long)

    first = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=batch.position_ids, output_hidden_states=True)
    # Only the last position's logits are needed; the uncached path keeps the original's full computation.
    out = forward_with_cache(lm, None, logits_to_keep=1, **first) if use_cache else lm(use_cache=False, **first)
    cache = returned_cache(out) if use_cache else None
    fixed = None
    if use_cache and decode in STATIC_PATHS:
        if not supports_static(lm):
            raise ValueError(f"decode={decode!r} needs an OPT model with ReLU and no int8 layers; use 'dynamic'")
        fixed = static_decoder(lm, embeds.shape[0], embeds.shape[1] + max_new_tokens + 1,
                               use_graph=decode != "static", compile=decode == "compiled")
        fixed.load_prefix(cache_layers(cache), mask)
        cache = None
    if fixed is not None and temperature == 0.0:
        return _greedy_on_device(model, fixed, out.logits[:, -1], next_position, mask.shape[1], max_new_tokens,
                                 ret_scale_factor, min_word_tokens, top_p, stop_at_newline, newline)
    tokens, ret_embeddings = [], []
    for step in range(max_new_tokens):
        token = choose_next_token(out.logits[:, -1], step, model.retrieval_token_idx, temperature=temperature, top_p=top_p,
                                  min_word_tokens=min_word_tokens, ret_scale_factor=ret_scale_factor, generator=generator)
        tokens.append(token)
        is_newline = (token == newline) & ~finished
        lengths = torch.where(is_newline, torch.full_like(lengths, step), lengths)
        finished |= is_newline
        # One more forward pass with this token as input: its hidden state is its [RET] embedding,
        # and its logits choose the following token.
        token_embeds = model.embed_tokens(token[:, None])
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if fixed is not None:
            logits, hidden = fixed.step(token_embeds, next_position, column=mask.shape[1] - 1)
            out = _StepOutput(logits[:, None], hidden)
        elif use_cache:
            out = forward_with_cache(lm, cache, inputs_embeds=token_embeds, attention_mask=mask,
                                     position_ids=next_position, output_hidden_states=True)
            cache = returned_cache(out)
        else:
            embeds = torch.cat([embeds, token_embeds], dim=1)
            generated_positions = prompt_lengths + torch.arange(len(tokens), device=mask.device)[None, :]
            positions = torch.cat([batch.position_ids, generated_positions], dim=1)
            out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                     output_hidden_states=True)
        next_position = next_position + 1
        ret_embeddings.append(F.normalize(model.retrieval_space(out.hidden_states)[:, -1].float(), dim=-1))
        if stop_at_newline and bool(finished.all()):
            break
    return GenerationOutput(torch.stack(tokens, dim=1), torch.stack(ret_embeddings, dim=1),
                            lengths.clamp(max=len(tokens)) if stop_at_newline else torch.full_like(lengths, len(tokens)))


def _greedy_on_device(model: FromageModel, fixed, last_logits, next_position, column: int, max_new_tokens: int,
                      ret_scale_factor: float, min_word_tokens: int, top_p: float, stop_at_newline: bool,
                      newline: int) -> GenerationOutput:
    """Greedy decoding with the loop body (embedding, decoder step, [RET] rule, argmax) on the device."""
    ret = model.retrieval_token_idx
    first = choose_next_token(last_logits, 0, ret, top_p=top_p, min_word_tokens=min_word_tokens,
                              ret_scale_factor=ret_scale_factor)
    steps = torch.arange(max_new_tokens + 1)
    forbidden = steps < min_word_tokens
    mult = torch.where(forbidden, torch.zeros(()), torch.full((), float(ret_scale_factor)))
    add = torch.where(forbidden, torch.full((), -float("inf")), torch.zeros(()))
    project = lambda hidden: F.normalize(model.retrieval_space(hidden)[:, -1].float(), dim=-1)  # noqa: E731
    tokens, embeddings = fixed.greedy(first, next_position, column, max_new_tokens, embed=model.input_embeddings,
                                      project=project, ret_token=ret, ret_mult=mult, ret_add=add,
                                      shared_dim=model.args.shared_emb_dim)
    lengths = torch.full((tokens.shape[0],), max_new_tokens, dtype=torch.long, device=tokens.device)
    if stop_at_newline:
        is_newline = tokens == newline
        first_newline = torch.where(is_newline.any(dim=1), is_newline.float().argmax(dim=1), lengths)
        lengths = first_newline
    return GenerationOutput(tokens, embeddings, lengths)


def embeds_device(batch: PaddedBatch) -> torch.device:
    return batch.embeds.device


@dataclass
class _StepOutput:
    """The two fields of a model output that the decoding loop reads."""
    logits: torch.Tensor
    hidden_states: tuple
