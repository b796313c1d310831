"""Attention rewrite: ExecuTorch's ``llama.custom_sdpa`` over a static KV cache updated in place.

Transformers models call ``past_key_values.update(k, v, layer_idx)`` and then the attention
function registered under ``config._attn_implementation``. We plug into both seams instead of
rewriting each family's attention module:

* :class:`StaticKVCache` is a transformers ``Cache`` whose ``update`` writes the new keys/values
  into per-layer buffers of ``max_seq_len`` positions with ``llama.update_cache`` (in place, no
  copy) and returns the whole buffers;
* :func:`custom_sdpa_attention`, registered as ``"et_custom_sdpa"``, runs ``llama.custom_sdpa``
  on those buffers; it masks causally from the current start position itself, so no mask tensor
  is built.

Buffers use ExecuTorch's ``[batch, seq, heads, head_dim]`` layout. The cache does not own the
buffers: the exportable wrapper registers them as module buffers so ``torch.export`` sees them as
mutable state.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache

ATTN_IMPLEMENTATION = "et_custom_sdpa"


def _load_custom_ops() -> None:
    # Registers torch.ops.llama.{custom_sdpa,update_cache,...} (eager kernels and fake impls).
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


class StaticKVCache(Cache):
    """A transformers ``Cache`` over fixed-size key/value buffers updated in place.

    Args:
        keys: per-layer key buffers ``[1, max_seq_len, kv_heads, head_dim]``.
        values: per-layer value buffers, same shapes.

    The wrapper sets :attr:`start_pos` (a python or symbolic int: the cache position of the first
    token of the current call) before each forward.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__(layers=[])
        self.keys = keys
        self.values = values
        self.start_pos: int | torch.SymInt = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write ``key_states``/``value_states`` ([B, H, S, D]) at ``start_pos``; return the buffers."""
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        torch.ops.llama.update_cache(key_states.transpose(1, 2), k_cache, self.start_pos)
        torch.ops.llama.update_cache(value_states.transpose(1, 2), v_cache, self.start_pos)
        return k_cache, v_cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions filled before the current call."""
        return self.start_pos

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """Capacity of the buffers."""
        return self.keys[0].shape[1]


def custom_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the static cache with ``llama.custom_sdpa`` (causal from ``start_pos``).

    Args:
        module: the transformers attention module (unused).
        query: ``[B, heads, S, head_dim]``.
        key, value: the cache buffers ``[B, max_seq_len, kv_heads, head_dim]`` returned by
            :meth:`StaticKVCache.update`.
        attention_mask: ignored: causality comes from ``start_pos`` (padding is never in the cache).
        scaling: softmax scale.
        kwargs: must carry ``et_cache``, the :class:`StaticKVCache` of the call.

    Returns:
        ``(output [B, S, heads, head_dim], None)``, as transformers attention functions do.
    """
    cache: StaticKVCache = kwargs["et_cache"]
    q = query.transpose(1, 2)
    out = torch.ops.llama.custom_sdpa(q, key, value, cache.start_pos, None, 0.0, True, scaling)
    return out, None


def register_attention() -> str:
    """Register :func:`custom_sdpa_attention` with transformers; return its implementation name."""
    _load_custom_ops()
    AttentionInterface.register(ATTN_IMPLEMENTATION, custom_sdpa_attention)
    return ATTN_IMPLEMENTATION
