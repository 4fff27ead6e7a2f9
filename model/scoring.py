"""Log-likelihood scoring: whole interleaved prompts (the original API) and many continuations of one
shared context (the context is encoded once; every continuation reuses its KV cache, and a context that
extends an earlier one, as a dialogue's next round does, reuses the earlier one's cache for their common
prefix)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .fromage import FromageModel
from .lm_cache import broadcast_cache, cache_layers, forward_with_cache, returned_cache
from .prompts import IGNORE_INDEX, EmbeddedPrompt, Prompt, embed_prompt, pad_batch, positions_from_mask, tokenize


@dataclass
class ContinuationScores:
    sum_logprob: torch.Tensor  # (N,) float32: sum of log p(token) over each continuation's tokens
    num_tokens: torch.Tensor   # (N,) tokens scored per continuation
    tokens_run: int = 0        # positions the LM computed for them (the prefix tree: a shared prefix once; the naive
                               # path: every padded row, its re-encoded context included); 0: not counted

    @property
    def mean_logprob(self) -> torch.Tensor:
        """Length-normalised score (what a fair comparison of options of different lengths uses)."""
        return self.sum_logprob / self.num_tokens.clamp(min=1)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under `logits` (..., V); 0 where the target is IGNORE_INDEX."""
    valid = targets != IGNORE_INDEX
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * valid


@torch.inference_mode()
def log_likelihood(model: FromageModel, prompt: Prompt) -> float:
    """The original `get_log_lik_scores`: minus the mean next-token loss over the text tokens."""
    embedded = embed_prompt(model, prompt)
    logits = model.lm(inputs_embeds=embedded.embeds[None], use_cache=False).logits[0]
    targets = embedded.labels[1:]
    scored = (targets != IGNORE_INDEX).sum()
    return float(target_logprobs(logits[:-1], targets).sum() / scored)


@dataclass
class EncodedContext:
    """A context run through the LM: what continuations are scored against."""
    embeds: torch.Tensor        # (T, D) its input embeddings (to find the prefix a later context shares)
    layers: list[tuple]         # per layer, keys and values (1, heads, T, head_dim)
    last_logits: torch.Tensor   # (V,) logits at its last position: they predict a continuation's first token
    reused: int = 0             # leading positions taken from an earlier context's cache

    def __len__(self) -> int:
        return self.embeds.shape[0]


def shared_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Leading positions at which two (T, D) input sequences are exactly equal."""
    n = min(len(a), len(b))
    same = (a[:n] == b[:n]).all(dim=1)
    return n if bool(same.all()) else int(same.float().argmin())


@torch.inference_mode()
def encode_context(model: FromageModel, context: Prompt | EmbeddedPrompt, previous: EncodedContext | None = None
                   ) -> EncodedContext:
    """Run `context` through the LM, continuing from the longest prefix of `previous` whose inputs are equal.

    Causal attention makes a position's keys/values depend on the inputs up to it only, so the shared prefix
    needs no recomputation. Equality is checked on the input embeddings themselves, not on text: a tokenizer
    that merges the boundary differently (the round's "A: " before its answer) simply shortens the prefix.
    At least the last position is always recomputed, for the logits that score a continuation's first token."""
    ctx = context if isinstance(context, EmbeddedPrompt) else embed_prompt(model, context)
    keep = 0
    if previous is not None:
        keep = min(shared_prefix_length(previous.embeds, ctx.embeds), len(ctx) - 1)
    past = broadcast_cache([(k[:, :, :keep], v[:, :, :keep]) for k, v in previous.layers], 1, model.lm.config) \
        if keep else None
    positions = torch.arange(keep, len(ctx), device=ctx.embeds.device)[None]
    out = forward_with_cache(model.lm, past, inputs_embeds=ctx.embeds[None, keep:], position_ids=positions,
                             logits_to_keep=1)
    return EncodedContext(ctx.embeds, cache_layers(returned_cache(out)), out.logits[0, -1], reused=keep)


TOKEN_MEMO_LIMIT = 200_000  # distinct continuation strings kept per tokenizer (VisDial val has about 340k answers)
_token_memo: "weakref.WeakKeyDictionary[object, tuple[int, dict[str, list[int]]]]" = weakref.WeakKeyDictionary()


def continuation_token_ids(tokenizer, continuations: Sequence[str]) -> list[list[int]]:
    """Each continuation's ids with special tokens (BOS first), tokenising only the strings this tokenizer has
    not seen: VisDial's rounds draw their 100 options from one answer list, so most repeat, and tokenising them
    again was a fifth of answer ranking's time on 2 CPU cores. The memo lives as long as the tokenizer, and
    starts afresh when tokens are added to it (its length changes)."""
    size = len(tokenizer)
    if tokenizer not in _token_memo or _token_memo[tokenizer][0] != size:
        _token_memo[tokenizer] = (size, {})
    memo = _token_memo[tokenizer][1]
    missing = list(dict.fromkeys(t for t in continuations if t not in memo))
    if missing:
        if len(memo) + len(missing) > TOKEN_MEMO_LIMIT:
            memo.clear()
        memo.update(zip(missing, tokenizer(missing, add_special_tokens=True).input_ids))
    return [memo[t] for t in continuations]


def tokenize_continuations(model: FromageModel, continuations: Sequence[str], with_bos: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """All continuations at once: a right-padded (N, T) id matrix (CPU) and the lengths.
    (Per-option tokenisation and embedding lookups cost more than the LM itself for a 7-token option.)"""
    rows = continuation_token_ids(model.tokenizer, continuations)
    bos = model.tokenizer.bos_token_id
    if not with_bos:
        rows = [r[1:] if r and r[0] == bos else r for r in rows]
    for text, r in zip(continuations, rows):
        if not r:
            raise ValueError(f"continuation {text!r} has no tokens")
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows])


def embed_continuations(model: FromageModel, continuations: Sequence[str], with_bos: bool) -> list[EmbeddedPrompt]:
    out = []
    for text in continuations:
        ids = tokenize(model, text, keep_bos=with_bos)
        if ids.numel() == 0:
            raise ValueError(f"continuation {text!r} has no tokens")
        out.append(EmbeddedPrompt(model.embed_tokens(ids), ids, ids))
    return out


@torch.inference_mode()
def score_continuations(model: FromageModel, context: Prompt | EmbeddedPrompt | EncodedContext,
                        continuations: Sequence[str], *,
                        continuation_bos: bool = False, shift: bool = True, batch_size: int | None = None,
                        original_rounding: bool = False) -> ContinuationScores:
    """Log-likelihood of each continuation after one shared interleaved `context`.

    The context goes through the LM once. The continuations' prefix tree (a prefix that several share is
    one node: every option's BOS, the "it is" of "it is red" and "it is blue") is then packed into ONE
    sequence that continues the context's KV cache, with an attention mask that lets each node see the
    context and its own ancestors only, at the position it has in its continuations: the context's
    keys/values are never copied per continuation (replicating them cost more than the LM itself), and a
    shared prefix runs once (VisDial's options: 40 % of the tokens with their BOS, 54 % without, on the
    miniworld). `shift=True` is the correct next-token scoring: a continuation's first token is predicted by
    the context's last position. `shift=False` reproduces the original VisDial script, which compared each
    position's logits with the token AT that position. `continuation_bos` keeps each continuation's own BOS
    token (the original tokenised options with special tokens). `batch_size` continuations are packed per
    forward pass (default: all). An `EncodedContext` (see `encode_context`) is used as it is.
    `original_rounding` rounds each token's log-probability and each continuation's sum to the logits' dtype
    (bf16/fp16 at those precisions), as the original VisDial script does (see `round_like_original`); by
    default both stay float32.
    """
    encoded = context if isinstance(context, EncodedContext) else encode_context(model, context)
    ctx_cache, ctx_len, ctx_last_logits = encoded.layers, len(encoded), encoded.last_logits

    ids, lengths = tokenize_continuations(model, continuations, continuation_bos)
    batch_size = batch_size or len(continuations)
    sums, counts, run = [], [], 0
    for start in range(0, len(continuations), batch_size):
        chunk_ids, chunk_len = ids[start:start + batch_size], lengths[start:start + batch_size]
        chunk_sums, chunk_run = _score_packed(model, ctx_cache, ctx_len, ctx_last_logits, chunk_ids, chunk_len, shift,
                                              original_rounding)
        sums.append(chunk_sums)
        counts.append(chunk_len)
        run += chunk_run
    return ContinuationScores(torch.cat(sums).cpu(), torch.cat(counts).cpu(), run)


def _prefix_tree(ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The continuations' token prefix tree: each distinct prefix is one node, so options that start alike
    ("it is red", "it is blue", and every option's own BOS) run their common tokens through the LM once.
    Returns per node its token and parent (-1: the context), parents always before children, and per
    continuation token its node (`path`, continuation after continuation)."""
    node_of: dict[tuple[int, int], int] = {}
    tokens, parents, path = [], [], []
    for row, length in zip(ids.tolist(), lengths.tolist()):
        node = -1
        for token in row[:length]:
            key = (node, token)
            if key not in node_of:
                node_of[key] = len(tokens)
                tokens.append(token)
                parents.append(node)
            node = node_of[key]
            path.append(node)
    return torch.tensor(tokens), torch.tensor(parents), torch.tensor(path)


def _ancestry(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, P) node i may attend node j iff j is i or one of its ancestors, and each node's depth (0: a
    continuation's first token)."""
    n = len(parents)
    allowed = torch.eye(n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    rows, up = torch.arange(n), parents.clone()
    while bool((up >= 0).any()):
        live = up >= 0
        allowed[rows[live], up[live]] = True
        depth += live
        up = torch.where(live, parents[up.clamp(min=0)], up)
    return allowed, depth


def _score_packed(model: FromageModel, ctx_cache, ctx_len: int, ctx_last_logits: torch.Tensor, ids: torch.Tensor,
                  lengths: torch.Tensor, shift: bool, original_rounding: bool = False) -> tuple[torch.Tensor, int]:
    """Summed log-probabilities of right-padded continuations `ids` (n, T), and the LM positions run: their
    prefix tree packed into one sequence after the context, each node attending to the context and its own
    ancestors, at the position it has in its continuations. A node's log-probability is computed once and
    counted in every continuation through it (the same value its own pass would give: the same inputs at the
    same positions)."""
    tokens, parents, path = _prefix_tree(ids, lengths)
    own, depth = _ancestry(parents)
    allowed = torch.cat([torch.ones(len(tokens), ctx_len, dtype=torch.bool), own], dim=1)
    device = model.device
    mask = _attention_mask_4d(model.lm, allowed.to(device), model.lm_dtype)
    positions = (ctx_len + depth).to(device)[None]
    cache = broadcast_cache(ctx_cache, 1, model.lm.config)  # a fresh cache holding the context (views, no copy)
    tokens = tokens.to(device)
    logits = forward_with_cache(model.lm, cache, inputs_embeds=model.embed_tokens(tokens)[None], attention_mask=mask,
                                position_ids=positions).logits[0]
    if shift:  # a node is predicted by its parent, a first token by the context's last position
        first = (parents < 0).to(device)
        from_parent = logits[parents.clamp(min=0).to(device)]
        logits = torch.where(first[:, None], ctx_last_logits[None].to(logits.dtype), from_parent)
    n = ids.shape[0]
    segment = torch.repeat_interleave(torch.arange(n), lengths)  # which continuation each path entry is in
    return summed_logprobs(logits, tokens, segment, n, original_rounding, path=path.to(device)), len(tokens)


def summed_logprobs(logits: torch.Tensor, targets: torch.Tensor, segment: torch.Tensor, n: int,
                    original_rounding: bool = False, path: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) float32 sums of log p(target) per continuation; `segment[i]` is the continuation of token i, or
    with `path`, of the token `path[i]` (tokens shared by several continuations are given once).
    `original_rounding`: each token's log-probability and each sum rounded to the logits' dtype."""
    dtype = logits.dtype if original_rounding else None
    token_logp = round_like_original(target_logprobs(logits, targets), dtype)
    if path is not None:
        token_logp = token_logp[path]
    sums = torch.zeros(n, device=logits.device).index_add_(0, segment.to(logits.device), token_logp)
    return round_like_original(sums, dtype)


def round_like_original(values: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """float32 `values` rounded to `dtype` (and back to float32); None leaves them as they are.

    The original VisDial script takes the cross-entropy of the model-dtype (bf16) logits, which returns
    each token's loss in that dtype, and sums the losses in that dtype: a float32 accumulation rounded once.
    Rounding float32 log-probabilities computed from the same logits, and then their float32 sum, reproduces
    both roundings (round-to-nearest is symmetric in sign, so log-probabilities round like losses)."""
    return values if dtype is None or dtype == torch.float32 else values.to(dtype).float()


def _attention_mask_4d(lm, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, q, kv) mask in the form the model's attention implementation takes: boolean for SDPA
    (True = attend), additive float for the eager implementation."""
    if lm.config._attn_implementation == "sdpa":
        return allowed[None, None]
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@torch.inference_mode()
def score_continuations_naive(model: FromageModel, context: Prompt, continuations: Sequence[str], *,
                              continuation_bos: bool = False, shift: bool = True, batch_size: int = 20,
                              original_rounding: bool = False) -> ContinuationScores:
    """Reference path, the way the original VisDial script works: every continuation gets the whole context
    re-encoded in front of it; the full sequences run in right-padded batches of `batch_size` (20 there)."""
    ctx = embed_prompt(model, context)
    conts = embed_continuations(model, continuations, continuation_bos)
    full = [EmbeddedPrompt(torch.cat([ctx.embeds, c.embeds]), torch.cat([torch.full_like(ctx.labels, IGNORE_INDEX), c.labels]),
                           c.labels) for c in conts]
    sums, counts, run = [], [], 0
    for start in range(0, len(full), batch_size):
        batch = pad_batch(full[start:start + batch_size], side="right")
        run += batch.embeds.shape[0] * batch.embeds.shape[1]
        logits = model.lm(inputs_embeds=batch.embeds, use_cache=False).logits
        if shift:
            logits, labels = logits[:, :-1], batch.labels[:, 1:]
        else:
            labels = batch.labels
        dtype = logits.dtype if original_rounding else None
        sums.append(round_like_original(round_like_original(target_logprobs(logits, labels), dtype).sum(dim=1), dtype))
        counts.append((labels != IGNORE_INDEX).sum(dim=1))
    return ContinuationScores(torch.cat(sums).cpu(), torch.cat(counts).cpu(), run)
