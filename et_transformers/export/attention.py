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

With an int8 cache (``kv_cache_dtype="int8"``), keys and values are quantized per token and head
(asymmetric int8, ExecuTorch's ``quantized_decomposed`` ops) before the update, their scales and
zero points are cached beside them, and attention runs ExecuTorch's ``llama.custom_quantized_sdpa``
with the query quantized the same way.

Buffers use ExecuTorch's ``[batch, seq, heads, head_dim]`` layout. The cache does not own the
buffers: the exportable wrapper registers them as module buffers so ``torch.export`` sees them as
mutable state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache

ATTN_IMPLEMENTATION = "et_custom_sdpa"


def _load_custom_ops() -> None:
    # Registers torch.ops.llama.{custom_sdpa,update_cache,...} (eager kernels and fake impls).
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (quantized_decomposed ops)


@dataclass
class LayerKV:
    """One layer's cache buffers (``[1, max_seq_len, kv_heads, head_dim]``).

    For an int8 cache, ``k``/``v`` are int8 and the per-(position, head) quantization parameters
    ``[1, max_seq_len, kv_heads, 1]`` live in the ``*_scales`` (float32) and ``*_zeros`` (int8)
    buffers.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_scales: torch.Tensor | None = None
    k_zeros: torch.Tensor | None = None
    v_scales: torch.Tensor | None = None
    v_zeros: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        """Whether keys and values are stored as int8."""
        return self.k_scales is not None


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int8 per last-dim row: returns ``(int8 values, float32 scales, int8 zero points)``."""
    qd = torch.ops.quantized_decomposed
    scales, zeros = qd.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    q = qd.quantize_per_token(x, scales, zeros, -128, 127, torch.int8)
    return q, scales.to(torch.float32), zeros.to(torch.int8)


class StaticKVCache(Cache):
    """A transformers ``Cache`` over fixed-size key/value buffers updated in place.

    Args:
        layers: per-layer buffers, indexed by the model's ``layer_idx`` (``None`` for layers that
            keep no cache).

    The wrapper sets :attr:`start_pos` (a python or symbolic int: the cache position of the first
    token of the current call) before each forward.
    """

    def __init__(self, layers: list[LayerKV | None]):
        super().__init__(layers=[])
        self.kv = layers
        self.start_pos: int | torch.SymInt = 0
        self.current: LayerKV | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write ``key_states``/``value_states`` ([B, H, S, D]) at ``start_pos``; return the buffers."""
        layer = self.kv[layer_idx]
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [B, S, H, D]
        if layer.quantized:
            for values, cache, scales, zeros in ((k, layer.k, layer.k_scales, layer.k_zeros),
                                                 (v, layer.v, layer.v_scales, layer.v_zeros)):
                q, s, z = quantize_per_token(values.float())
                torch.ops.llama.update_cache(q, cache, self.start_pos)
                torch.ops.llama.update_cache(s, scales, self.start_pos)
                torch.ops.llama.update_cache(z, zeros, self.start_pos)
        else:
            torch.ops.llama.update_cache(k, layer.k, self.start_pos)
            torch.ops.llama.update_cache(v, layer.v, self.start_pos)
        self.current = layer  # the attention function that follows reads this layer's buffers
        return layer.k, layer.v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions filled before the current call."""
        return self.start_pos

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """Capacity of the buffers."""
        return next(layer for layer in self.kv if layer is not None).k.shape[1]


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
    q = query.transpose(1, 2)  # [B, S, H, D]
    layer = cache.current
    if not layer.quantized:
        return torch.ops.llama.custom_sdpa(q, key, value, cache.start_pos, None, 0.0, True, scaling), None
    q8, q_scales, q_zeros = quantize_per_token(q.float())
    out = torch.ops.llama.custom_quantized_sdpa(
        q8, key, value, cache.start_pos, None, 0.0, True, scaling,
        q_zeros, q_scales, layer.k_zeros, layer.k_scales, layer.v_zeros, layer.v_scales,
    )
    return out.to(query.dtype), None


def register_attention() -> str:
    """Register :func:`custom_sdpa_attention` with transformers; return its implementation name."""
    _load_custom_ops()
    AttentionInterface.register(ATTN_IMPLEMENTATION, custom_sdpa_attention)
    return ATTN_IMPLEMENTATION
