"""KV-cache plumbing across transformers releases: 5.2x renamed the forward argument and output field
`past_key_values` to `cache` (the old name warns); older 5.x releases know only `past_key_values`."""
from __future__ import annotations

import inspect

from transformers import DynamicCache, OPTForCausalLM

CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(OPTForCausalLM.forward).parameters else "past_key_values"


def forward_with_cache(lm, cache, **kwargs):
    """lm(**kwargs) continuing from `cache` (a DynamicCache, updated in place) and returning a new one."""
    kwargs[CACHE_ARGUMENT] = cache
    return lm(use_cache=True, **kwargs)


def returned_cache(output) -> DynamicCache:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def broadcast_cache(layers: list[tuple], batch: int, config) -> DynamicCache:
    """A fresh cache holding the (1, heads, T, d) keys/values of `layers` repeated for `batch` rows (views,
    not copies: the cache's update concatenates into new tensors, so the originals stay intact)."""
    cache = DynamicCache(config=config)
    for layer_idx, (keys, values) in enumerate(layers):
        cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer_idx)
    return cache


def cache_layers(cache: DynamicCache) -> list[tuple]:
    return [(layer.keys, layer.values) for layer in cache.layers]
