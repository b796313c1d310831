"""Attention rewrite: ExecuTorch's ``llama.custom_sdpa`` over a static KV cache updated in place.

Transformers models call ``past_key_values.update(k, v, layer_idx)`` and then the attention
function registered under ``config._attn_implementation``. We plug into both seams instead of
rewriting each family's attention module:

* :class:`StaticKVCache` is a transformers ``Cache`` whose ``update`` writes the new keys/values
  into per-layer buffers of ``max_seq_len`` positions with ``llama.update_cache`` (in place, no
  copy) and returns the whole buffers;
* :func:`custom_sdpa_attention`, registered as ``"et_custom_sdpa"``, runs ``llama.custom_sdpa``
  on those buffers; it masks causally from the current start position itself, so no mask tensor
  is built for ordinary layers.

Two family features need more, and only the layers that have them pay for it:

* sliding-window layers (Mistral, Gemma2/3 local layers, Qwen2/3 and Phi-3 when configured) keep
  the full cache; ``custom_sdpa`` gets an explicit ``[S, max_seq_len]`` additive mask that allows
  key ``k`` for query ``q`` iff ``q - window < k <= q`` (transformers' rule), so the window is exact
  at every position and the whole ``max_seq_len`` context stays usable. A window at least as long
  as the cache excludes nothing and takes the fast path;
* attention-logit softcapping (Gemma2) is not something ``custom_sdpa`` can do, so those layers run
  transformers' eager attention math (``tanh`` capping, mask, float32 softmax) in plain torch over
  the same cache buffers.

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
    token of the current call) and :attr:`positions` (``[S]``, the call's cache positions) before
    each forward.
    """

    def __init__(self, layers: list[LayerKV | None]):
        super().__init__(layers=[])
        self.kv = layers
        self.start_pos: int | torch.SymInt = 0
        self.positions: torch.Tensor | None = None
        self.current: LayerKV | None = None
        #: run float caches without a mask through our ``et_transformers::sdpa`` kernel instead of
        #: ``llama.custom_sdpa`` (programs that need our kernel library anyway: the ``q4_0`` scheme)
        self.own_attention = False
        self._masks: dict[tuple[int | None, torch.dtype], torch.Tensor] = {}

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The call's additive mask ``[S, max_seq_len]``: 0 where query ``q`` may see key ``k``
        (``k <= q``, and ``k > q - window`` when ``window`` is set), ``-inf`` elsewhere.

        Built once per call and window, and shared by every layer that asks for it.
        """
        key = (window, dtype)
        if key not in self._masks:
            q = self.positions.unsqueeze(1)  # [S, 1]
            k = torch.arange(self.get_max_length(), dtype=q.dtype).unsqueeze(0)  # [1, L]
            allowed = k <= q
            if window is not None:
                allowed = allowed & (k > q - window)
            zero = torch.zeros((), dtype=dtype)
            self._masks[key] = torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype))
        return self._masks[key]

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


def needs_window_mask(sliding_window: int | None, max_seq_len: int) -> bool:
    """Whether a ``sliding_window`` excludes any key inside a cache of ``max_seq_len`` positions."""
    return sliding_window is not None and sliding_window < max_seq_len


def custom_sdpa_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None,
    **kwargs,
):
    """Attention over the static cache with ``llama.custom_sdpa`` (causal from ``start_pos``).

    Args:
        module: the transformers attention module (unused).
        query: ``[B, heads, S, head_dim]``.
        key, value: the cache buffers ``[B, max_seq_len, kv_heads, head_dim]`` returned by
            :meth:`StaticKVCache.update`.
        attention_mask: ignored: causality comes from ``start_pos`` (padding is never in the cache).
        scaling: softmax scale.
        sliding_window: the layer's window (transformers passes it for sliding layers), or None.
        softcap: attention-logit softcapping (Gemma2), or None.
        kwargs: must carry ``et_cache``, the :class:`StaticKVCache` of the call.

    Returns:
        ``(output [B, S, heads, head_dim], None)``, as transformers attention functions do.
    """
    cache: StaticKVCache = kwargs["et_cache"]
    q = query.transpose(1, 2)  # [B, S, H, D]
    layer = cache.current
    window = sliding_window if needs_window_mask(sliding_window, key.shape[1]) else None
    if softcap is not None:
        return softcapped_attention(query, layer, cache.mask(window, query.dtype), scaling, softcap), None
    mask = None if window is None else cache.mask(window, q.dtype if not layer.quantized else torch.float32)
    is_causal = mask is None
    if not layer.quantized:
        if cache.own_attention and mask is None and q.dtype == torch.float32:
            from ..kernels import ops  # noqa: F401  (defines the operator)

            scale = scaling if scaling is not None else q.shape[-1] ** -0.5
            return torch.ops.et_transformers.sdpa(q, key, value, cache.start_pos, scale), None
        return torch.ops.llama.custom_sdpa(q, key, value, cache.start_pos, mask, 0.0, is_causal, scaling), None
    q8, q_scales, q_zeros = quantize_per_token(q.float())
    out = torch.ops.llama.custom_quantized_sdpa(
        q8, key, value, cache.start_pos, mask, 0.0, is_causal, scaling,
        q_zeros, q_scales, layer.k_zeros, layer.k_scales, layer.v_zeros, layer.v_scales,
    )
    return out.to(query.dtype), None


def _dequantized(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype):
    """The inverse of :func:`quantize_per_token`, as one op (XNNPACK leaves it to the portable kernels)."""
    qd = torch.ops.quantized_decomposed
    return qd.dequantize_per_token(values, scales, zeros.to(torch.int64), -128, 127, torch.int8, dtype)


def softcapped_attention(
    query: torch.Tensor, layer: LayerKV, mask: torch.Tensor, scaling: float, softcap: float
) -> torch.Tensor:
    """Transformers' eager attention with logit softcapping, over the whole cache.

    Args:
        query: ``[1, heads, S, head_dim]``.
        layer: the layer's cache buffers ``[1, L, kv_heads, head_dim]`` (int8 ones are dequantized).
        mask: additive ``[S, L]`` (causal, and the window when the layer has one).
        scaling: softmax scale.
        softcap: logits become ``tanh(logits / softcap) * softcap`` before masking.

    Returns:
        ``[1, S, heads, head_dim]``.
    """
    k, v = layer.k, layer.v
    if layer.quantized:
        k = _dequantized(k, layer.k_scales, layer.k_zeros, query.dtype)
        v = _dequantized(v, layer.v_scales, layer.v_zeros, query.dtype)
    kv_heads = k.shape[2]
    # Grouped-query attention by broadcasting, not by repeating the cache: query heads grouped per
    # kv head ([kv_heads, groups, S, D]) against keys [kv_heads, 1, D, L]. (Merging the groups into
    # one 3-D bmm makes torch.export guard on the sequence length.)
    qg = query.unflatten(1, (kv_heads, -1))[0]  # [kv_heads, groups, S, D]
    scores = torch.matmul(qg, k[0].permute(1, 2, 0).unsqueeze(1)) * scaling  # [kv_heads, groups, S, L]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, v[0].transpose(0, 1).unsqueeze(1))  # [kv_heads, groups, S, D]
    return out.flatten(0, 1).transpose(0, 1).unsqueeze(0)  # [1, S, heads, D]


def register_attention() -> str:
    """Register :func:`custom_sdpa_attention` with transformers; return its implementation name."""
    _load_custom_ops()
    AttentionInterface.register(ATTN_IMPLEMENTATION, custom_sdpa_attention)
    return ATTN_IMPLEMENTATION
