"""OPT decoding against fixed-size KV buffers, so that one decode step has the same shapes every time and
can be captured once as a CUDA graph and replayed: one launch per token instead of several hundred
(Python launch overhead, not weight reads, bounds batch-1 decoding of a 6.7B model in eager mode).

The step computes what `OPTDecoderLayer` computes, in the same order and with the same attention scaling,
so greedy tokens match the dynamic-cache path (a test checks this on CPU without the graph). Two things
differ in how it is computed, both because batch-1 decoding is bound by weight reads and kernel launches:
q, k and v come from one fused (3H, H) projection (one GEMV instead of three), and each layer's two halves
are pure functions of tensors, which `compile=True` hands to `torch.compile` (layer norms, bias, residual
and ReLU fused; one compiled graph serves every layer since all have the same shapes). bitsandbytes int8
layers pick outlier columns at run time and cannot be captured: int8 models keep the dynamic path.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_FUSED_QKV: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # attention module -> (weight, bias)


def supports_static(lm) -> bool:
    cfg = lm.config
    quantized = any(type(m).__name__.startswith("Linear8bit") for m in lm.model.decoder.layers[0].modules())
    return (not quantized and cfg.model_type == "opt" and not getattr(cfg, "layerdrop", 0.0) > 0 and not lm.training
            and cfg.activation_function == "relu")


def fused_qkv(attn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention's q/k/v weights and biases as one (3H, H) matrix and (3H,) vector (None without biases).

    The three projections are re-pointed at row blocks of the fused tensors, so nothing is held twice (3.2 GB
    for OPT-6.7B in bf16) and the Hugging Face forward (prefill, training) keeps working on the same numbers.
    Re-fused if the weights were replaced since (e.g. the model was moved or cast)."""
    fused = _FUSED_QKV.get(attn)
    if fused is not None and fused[0].data_ptr() == attn.q_proj.weight.data_ptr():
        return fused
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: the parameters stay usable for autograd
        weight = torch.cat([p.weight.detach() for p in projections])
        has_bias = attn.q_proj.bias is not None  # OPTConfig(enable_bias=False) has none
        bias = torch.cat([p.bias.detach() for p in projections]) if has_bias else None
        rows = attn.q_proj.weight.shape[0]
        for i, p in enumerate(projections):
            p.weight.data = weight[i * rows:(i + 1) * rows]
            if has_bias:
                p.bias.data = bias[i * rows:(i + 1) * rows]
    _FUSED_QKV[attn] = (weight, bias)
    return weight, bias


def fuse_qkv_layers(lm) -> None:
    """Fuse every layer's q/k/v now, outside any CUDA-graph capture or side stream, then hand the allocator's
    cached blocks back once: each layer's three freed projections (32 MiB each for OPT-6.7B in bf16) are
    too small for the next layer's (3H, H) tensor, so without this about 3 GB stay reserved and unused."""
    fused_any = False
    for layer in lm.model.decoder.layers:
        before = _FUSED_QKV.get(layer.self_attn)
        fused_any |= fused_qkv(layer.self_attn) is not before
    if fused_any:
        _release_cached_blocks(lm.model.decoder.embed_tokens.weight.device)


def _release_cached_blocks(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        torch.cuda.empty_cache()


def attention_inputs(h, norm, qkv_weight, qkv_bias, scaling: float, heads: int, pre_norm: bool):
    """First half of an OPT layer for one new position: (B, 1, H) -> q, k, v, each (B, heads, 1, head_dim)."""
    b = h.shape[0]
    x = F.layer_norm(h, h.shape[-1:], *norm) if pre_norm else h
    q, k, v = F.linear(x, qkv_weight, qkv_bias).split(h.shape[-1], dim=-1)
    q = q * scaling  # before the product, as OPTAttention does (same rounding)
    return tuple(t.view(b, 1, heads, -1).transpose(1, 2) for t in (q, k, v))


def attention_output_and_mlp(residual, attention, out_weight, out_bias, norm1, norm2, fc1_weight, fc1_bias,
                             fc2_weight, fc2_bias, pre_norm: bool):
    """Second half: output projection, residual, MLP, residual (layer norms where the config puts them)."""
    b = residual.shape[0]
    h = residual + F.linear(attention.transpose(1, 2).reshape(b, 1, -1), out_weight, out_bias)
    if not pre_norm:
        h = F.layer_norm(h, h.shape[-1:], *norm1)
    x = F.layer_norm(h, h.shape[-1:], *norm2) if pre_norm else h
    h = h + F.linear(F.relu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    return h if pre_norm else F.layer_norm(h, h.shape[-1:], *norm2)


_COMPILED: dict = {}  # function -> its torch.compile wrapper, shared by every decoder (graphs cached per shape)


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[fn]


def _norm(layer_norm) -> tuple:
    return layer_norm.weight, layer_norm.bias, layer_norm.eps


class StaticDecoder:
    def __init__(self, lm, batch_size: int, max_len: int, use_graph: bool, compile: bool = False):
        self.lm = lm
        self.decoder = lm.model.decoder
        cfg = lm.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        weight = self.decoder.embed_tokens.weight
        self.device, dtype = weight.device, weight.dtype
        n_layers = len(self.decoder.layers)
        shape = (n_layers, batch_size, self.heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=dtype, device=self.device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=self.device)
        self.x = torch.zeros(batch_size, 1, cfg.word_embed_proj_dim, dtype=dtype, device=self.device)
        self.pos = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.col = torch.zeros(1, dtype=torch.long, device=self.device)
        self.max_len = max_len
        self.use_graph = use_graph and self.device.type == "cuda"
        self.graph = None
        self.outputs = None
        self.first_half = _compiled(attention_inputs) if compile else attention_inputs
        self.second_half = _compiled(attention_output_and_mlp) if compile else attention_output_and_mlp
        # greedy decoding entirely on the device (see `greedy`)
        self.token = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=self.device)
        self.greedy_graph = None
        self.greedy_key = None
        fuse_qkv_layers(lm)

    def load_prefix(self, layers: list[tuple[torch.Tensor, torch.Tensor]], prompt_mask: torch.Tensor) -> None:
        """Copy a prefill's keys/values (B, heads, T, head_dim) per layer and its padding mask in."""
        width = prompt_mask.shape[1]
        self.keys.zero_()
        self.values.zero_()
        self.valid.zero_()
        for i, (k, v) in enumerate(layers):
            self.keys[i, :, :, :width] = k
            self.values[i, :, :, :width] = v
        self.valid[:, :width] = prompt_mask.bool()

    def _layer(self, i: int, layer, h: torch.Tensor) -> torch.Tensor:
        attn, pre_norm = layer.self_attn, layer.do_layer_norm_before
        q, k, v = self.first_half(h, _norm(layer.self_attn_layer_norm), *fused_qkv(attn), attn.scaling, self.heads,
                                  pre_norm)
        self.keys[i].index_copy_(2, self.col, k)
        self.values[i].index_copy_(2, self.col, v)
        mask = self.valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, self.keys[i], self.values[i], attn_mask=mask, scale=1.0)
        return self.second_half(h, out, attn.out_proj.weight, attn.out_proj.bias, _norm(layer.self_attn_layer_norm),
                                _norm(layer.final_layer_norm), layer.fc1.weight, layer.fc1.bias, layer.fc2.weight,
                                layer.fc2.bias, pre_norm)

    def _step(self):
        """One token for every row: (logits (B, V), hidden states laid out as Hugging Face's)."""
        dec = self.decoder
        x = dec.project_in(self.x) if dec.project_in is not None else self.x
        h = x + F.embedding(self.pos + dec.embed_positions.offset, dec.embed_positions.weight)
        hidden = [h]
        for i, layer in enumerate(dec.layers):
            h = self._layer(i, layer, h)
            hidden.append(h)
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        if dec.project_out is not None:
            h = dec.project_out(h)
        hidden[-1] = h  # as Hugging Face: the last entry is the final, normalised (and projected) output
        return self.lm.lm_head(h)[:, -1], tuple(hidden)

    def step(self, embeds: torch.Tensor, positions: torch.Tensor, column: int):
        """Feed (B, 1, D) embeddings at per-row `positions` (B, 1), stored in cache column `column`."""
        if column >= self.max_len:
            raise ValueError("static KV cache is full")
        self.x.copy_(embeds)
        self.pos.copy_(positions)
        self.col.fill_(column)
        self.valid[:, column] = True
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up outside the capture (same column: idempotent writes)
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self._step()
        self.graph.replay()
        return self.outputs


    # -- greedy decoding with the whole loop body on the device -------------------------------------------
    def _greedy_step(self, embed, project, ret_token: int, ret_mult: torch.Tensor, ret_add: torch.Tensor,
                     tokens: torch.Tensor, embeddings: torch.Tensor):
        """Feed `self.token`, record its [RET] embedding, choose the next token by the original's rules and
        advance every counter: replaying this step N times decodes N tokens with no host round trip."""
        self.valid.index_fill_(1, self.col, True)
        self.x.copy_(embed(self.token)[:, None])
        logits, hidden = self._step()
        embeddings.index_copy_(1, self.step_index, project(hidden)[:, None].to(embeddings.dtype))
        logits = logits.float()
        following = self.step_index + 1
        ret_logit = logits[:, ret_token] * ret_mult.index_select(0, following) + ret_add.index_select(0, following)
        logits = logits.index_copy(1, torch.full_like(self.step_index, ret_token), ret_logit[:, None])
        chosen = logits.argmax(dim=-1)
        tokens.index_copy_(1, following, chosen[:, None])
        self.token.copy_(chosen)
        self.pos.add_(1)
        self.col.add_(1)
        self.step_index.add_(1)

    def greedy(self, first_token: torch.Tensor, positions: torch.Tensor, column: int, n_tokens: int, *, embed, project,
               ret_token: int, ret_mult: torch.Tensor, ret_add: torch.Tensor, shared_dim: int):
        """Greedy decoding after a prefill whose chosen first token is `first_token` (B,): returns token ids
        (B, n_tokens) and their [RET] embeddings (B, n_tokens, shared_dim). `ret_mult`/`ret_add` (n_tokens + 1,)
        hold, per step, the factor and offset applied to the [RET] logit (ret_scale_factor, min_word_tokens)."""
        if column + n_tokens > self.max_len:
            raise ValueError("static KV cache is full")
        b = first_token.shape[0]
        if self.use_graph and self.greedy_key != (n_tokens, ret_token, shared_dim, b):
            # the graph reads and writes fixed tensors: one set of buffers per captured graph
            self._greedy_buffers = self._new_greedy_buffers(b, n_tokens, shared_dim, ret_mult, ret_add)
            tokens, embeddings, mult, add = self._greedy_buffers
            tokens[:, 0] = first_token
            self._capture_greedy((embed, project, ret_token, mult, add, tokens, embeddings), first_token, positions, column)
            self.greedy_key = (n_tokens, ret_token, shared_dim, b)
        buffers = self._greedy_buffers if self.use_graph else self._new_greedy_buffers(b, n_tokens, shared_dim, ret_mult,
                                                                                       ret_add)
        tokens, embeddings, mult, add = buffers
        mult.copy_(ret_mult)
        add.copy_(ret_add)
        tokens.zero_()
        tokens[:, 0] = first_token
        self._greedy_reset(first_token, positions, column)
        for _ in range(n_tokens):
            if self.use_graph:
                self.greedy_graph.replay()
            else:
                self._greedy_step(embed, project, ret_token, mult, add, tokens, embeddings)
        return tokens[:, :n_tokens].clone(), embeddings[:, :n_tokens].clone()

    def _new_greedy_buffers(self, b, n_tokens, shared_dim, ret_mult, ret_add):
        return (torch.zeros(b, n_tokens + 1, dtype=torch.long, device=self.device),
                torch.zeros(b, n_tokens + 1, shared_dim, dtype=torch.float32, device=self.device),
                ret_mult.to(self.device, torch.float32).clone(), ret_add.to(self.device, torch.float32).clone())

    def _greedy_reset(self, first_token, positions, column):
        self.token.copy_(first_token)
        self.pos.copy_(positions)
        self.col.fill_(column)
        self.step_index.zero_()

    def _capture_greedy(self, args, first_token, positions, column):
        keys, values, valid = self.keys.clone(), self.values.clone(), self.valid.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._greedy_reset(first_token, positions, column)
                self._greedy_step(*args)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._greedy_reset(first_token, positions, column)
        self.greedy_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.greedy_graph):
            self._greedy_step(*args)
        self.keys.copy_(keys)  # undo the warm-up's writes
        self.values.copy_(values)
        self.valid.copy_(valid)


def static_decoder(lm, batch_size: int, max_len: int, use_graph: bool, compile: bool = False) -> StaticDecoder:
    """A decoder with room for `max_len` tokens, reused while the model and sizes stay the same (graphs are
    costly to capture). The decoders are an attribute of `lm`, not a module-level cache: they hold the LM and
    device buffers, so they must go when the model goes (a lm <-> decoder cycle, which the collector frees)."""
    max_len = (max_len + 63) // 64 * 64  # fewer distinct sizes -> fewer graphs to capture
    decoders = lm.__dict__.setdefault("_static_decoders", {})  # (batch, max_len, graph, compile) -> StaticDecoder
    key = (batch_size, max_len, use_graph, compile)
    if key not in decoders:
        if len(decoders) >= 4:
            decoders.pop(next(iter(decoders)))
        decoders[key] = StaticDecoder(lm, batch_size, max_len, use_graph, compile)
    return decoders[key]
