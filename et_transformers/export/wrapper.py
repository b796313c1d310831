"""The exportable module: ``forward(input_ids[1, S], cache_position[S]) -> logits[1, k, vocab]``.

:class:`ExportableCausalLM` wraps a transformers causal LM whose attention is the custom SDPA
(:mod:`.attention`), owns one key and one value buffer per attention layer (registered as module
buffers so ``torch.export`` makes them the program's mutable state), and returns the logits of
the last ``k`` positions only (``verify_tokens``; rows before position 0 are padding, except
with our own kernel's head, which returns ``min(S, k)`` rows; ``[1, vocab]`` when it is 1): prefill never
materialises ``[S, vocab]`` logits nobody reads, a decode step computes one row, and one call
scores a whole draft of assisted generation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers.cache_utils import Cache

from . import rope
from .attention import LayerKV, StaticKVCache, register_attention
from .layer_ops import own_rotary

logger = logging.getLogger(__name__)


class _ShapeProbe(Cache):
    """Records the key/value shapes each layer writes, without caching anything."""

    def __init__(self):
        super().__init__(layers=[])
        self.shapes: dict[int, tuple[torch.Size, torch.Size, torch.dtype]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.shapes[layer_idx] = (key_states.shape, value_states.shape, key_states.dtype)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def probe_model(model: nn.Module) -> tuple[dict[int, tuple[torch.Size, torch.Size, torch.dtype]], set[int]]:
    """Run one token through ``model``; return its KV layout and the widths it rotates.

    Returns:
        ``({layer_idx: (k_shape, v_shape, dtype)}, rotary_widths)``: shapes are
        ``[B, kv_heads, 1, head_dim]`` as transformers passes them to the cache, and
        ``rotary_widths`` the last-dim sizes ``rotate_half`` saw. Probing, rather than reading
        config fields, works for every family's naming, head layout and partial rotary.
    """
    probe = _ShapeProbe()
    widths: set[int] = set()
    ids = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad(), rope.swap_rotate_half(model, _recorder(model, widths)):
        model(input_ids=ids, position_ids=torch.zeros(1, 1, dtype=torch.long), past_key_values=probe, use_cache=True)
    if not probe.shapes:
        raise ValueError("the model wrote nothing to its KV cache; it is not a decoder with attention cache.")
    return probe.shapes, widths


def _recorder(model: nn.Module, widths: set[int]):
    if getattr(rope.modeling_module(model), "rotate_half", None) is None:
        return None
    return rope.recording_rotate_half(model, widths)


class ExportableCausalLM(nn.Module):
    """A causal LM with a static in-place KV cache and last-position logits.

    Args:
        model: a transformers ``*ForCausalLM`` in eval mode.
        max_seq_len: positions in the KV cache (the whole context).
        kv_cache_dtype: ``None`` to cache keys/values in the model's dtype, ``"int8"`` to quantize
            them per token and head (see :mod:`.attention`).
        logits: ``"last"`` (default) returns the last positions' logits, ``"all"`` every position's
            (an evaluation program: ``[1, S, vocab]``).
        verify_tokens: with ``logits="last"``, how many trailing positions' logits to return.
        own_kernels: run attention over float caches without a mask through our
            ``et_transformers::sdpa`` kernel and full-width float32 RoPE through
            ``et_transformers::rope`` (programs that need our kernel library anyway).

    ``forward(input_ids, cache_position)`` takes ``input_ids`` ``[1, S]`` (int64) and
    ``cache_position`` ``[S]`` (int64, consecutive, starting at the number of tokens already in the
    cache) and returns float32 logits ``[1, verify_tokens, vocab]`` for positions ``S-k .. S-1``
    (rows before the first position are padding; ``[1, min(S, verify_tokens), vocab]`` when the
    head is our own kernel; ``[1, vocab]`` when ``verify_tokens`` is 1, ``[1, S, vocab]`` with
    ``logits="all"``).
    """

    def __init__(
        self,
        model: nn.Module,
        max_seq_len: int,
        kv_cache_dtype: str | None = None,
        logits: str = "last",
        verify_tokens: int = 1,
        own_kernels: bool = False,
    ):
        super().__init__()
        self.verify_tokens = verify_tokens
        self.own_kernels = own_kernels
        self.model = model
        self.max_seq_len = max_seq_len
        self.kv_cache_dtype = kv_cache_dtype
        self.all_logits = logits == "all"
        layout, rotary_widths = probe_model(model)
        self.layer_ids = sorted(layout)
        self.head_dims = {int(layout[i][0][3]) for i in self.layer_ids}
        quantized = kv_cache_dtype == "int8"
        for idx in self.layer_ids:
            k_shape, v_shape, dtype = layout[idx]
            cache_dtype = torch.int8 if quantized else dtype
            # [B, H, 1, D] -> cache [1, max_seq_len, H, D]
            for name, shape in (("k", k_shape), ("v", v_shape)):
                self.register_buffer(
                    f"{name}_cache_{idx}", torch.zeros(1, max_seq_len, shape[1], shape[3], dtype=cache_dtype)
                )
                if quantized:
                    self.register_buffer(f"{name}_scales_{idx}", torch.ones(1, max_seq_len, shape[1], 1))
                    self.register_buffer(
                        f"{name}_zeros_{idx}", torch.zeros(1, max_seq_len, shape[1], 1, dtype=torch.int8)
                    )
        self.rotary_widths = sorted(rotary_widths)
        if rotary_widths:
            self.register_buffer(rope.BUFFER_NAME, rope.pair_signs(), persistent=False)
        model.config._attn_implementation = register_attention()
        logger.debug("KV cache: %d layers, %s", len(self.layer_ids), {i: tuple(layout[i][0]) for i in self.layer_ids})

    def to_dtype(self, dtype: torch.dtype, *, skip: Iterable[torch.Tensor] = ()) -> "ExportableCausalLM":
        """Cast weights, float caches and rope matrices to ``dtype``; int8 caches and their float32
        quantization scales stay as they are.

        Args:
            dtype: the target floating dtype.
            skip: parameters to leave as they are (the quantize stage casts them one layer at a
                time, so a half-precision checkpoint never exists whole in float32).
        """
        skipped = {id(t) for t in skip}
        for module in self.model.modules():
            for param in module._parameters.values():
                if param is not None and param.is_floating_point() and id(param) not in skipped:
                    param.data = param.data.to(dtype)  # in place: tied parameters stay tied
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_floating_point():
                    module._buffers[name] = buf.to(dtype)
        for name, buf in list(self.named_buffers(recurse=False)):
            if buf.is_floating_point() and "_scales_" not in name:
                setattr(self, name, buf.to(dtype))
        return self

    @contextlib.contextmanager
    def for_export(self):
        """Context manager: inside it, RoPE's ``rotate_half`` runs as ops XNNPACK delegates.

        Float32 programs take the pairwise form; bf16/fp16 ones (cast by :meth:`to_dtype` before
        this) the rotation matrices, registered here in the program's dtype. With our kernels,
        full-width RoPE runs as ``et_transformers::rope`` instead (see :mod:`.layer_ops`).
        """
        dtype = getattr(self, rope.BUFFER_NAME).dtype if self.rotary_widths else torch.float32
        with contextlib.ExitStack() as stack:
            if self.own_kernels and dtype == torch.float32:
                stack.enter_context(own_rotary(self.model, self.head_dims))
            if dtype == torch.float32:
                stack.enter_context(rope.swap_rotate_half(self.model, rope.pairwise_rotate_half(self)))
            else:
                for width in self.rotary_widths:
                    self.register_buffer(rope.matrix_name(width), rope.rotation_matrix(width, dtype), persistent=False)
                stack.enter_context(rope.swap_rotate_half(self.model, rope.matmul_rotate_half(self, self.head_dims)))
            yield

    def _kv_buffers(self):
        """``(name, buffer)`` of the key/value buffers and their quantization parameters."""
        return [(n, b) for n, b in self.named_buffers(recurse=False) if n.split("_")[1] in ("cache", "scales", "zeros")]

    def kv_cache_bytes(self) -> int:
        """Bytes of all key/value buffers (and their quantization parameters)."""
        return sum(b.numel() * b.element_size() for _, b in self._kv_buffers())

    def reset_kv_cache(self) -> None:
        """Put the key/value buffers back in their initial state (after an eager run, e.g. calibration)."""
        with torch.no_grad():
            for name, buf in self._kv_buffers():
                buf.fill_(1.0) if name.split("_")[1] == "scales" else buf.zero_()

    def _cache(self) -> StaticKVCache:
        layers: list[LayerKV | None] = [None] * (max(self.layer_ids) + 1)
        for i in self.layer_ids:
            extra = {}
            if self.kv_cache_dtype == "int8":
                extra = {f"{kv}_{part}": getattr(self, f"{kv}_{part}_{i}") for kv in "kv" for part in ("scales", "zeros")}
            layers[i] = LayerKV(getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}"), **extra)
        cache = StaticKVCache(layers)
        cache.own_attention = self.own_kernels
        return cache

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Run ``input_ids`` at ``cache_position``; return the last positions' logits (see the class)."""
        return self._logits(cache_position, input_ids.shape[1], input_ids=input_ids)

    def _logits(self, cache_position: torch.Tensor, n: int, **inputs: torch.Tensor) -> torch.Tensor:
        """The logits of ``n`` positions at ``cache_position`` given ``input_ids=`` or ``inputs_embeds=``."""
        # inputs: [1, S] ids or [1, S, hidden] embeddings; cache_position: [S]
        start = cache_position[0].item()
        torch._check(start >= 0)
        torch._check(start + n <= self.max_seq_len)
        cache = self._cache()
        cache.start_pos = start
        cache.positions = cache_position
        keep = 0 if self.all_logits else 1
        head_swap = contextlib.nullcontext()
        if not self.all_logits and self.verify_tokens > 1:
            # The head sees every position and takes the last k itself: transformers'
            # negative-start slice (logits_to_keep=k) would make torch.export guard S < k.
            keep, head_swap = 0, _narrowed_head(self.model, self.verify_tokens, self._head_rows(cache_position, n))
        with head_swap:
            out = self.model(
                **inputs,
                position_ids=cache_position.unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=keep,
                et_cache=cache,
            )
        if self.all_logits or self.verify_tokens > 1:
            # [1, S, V]; or [1, min(S, k), V] (an own-kernel head), or [1, k, V] (rows before position 0 are padding)
            return out.logits.float()
        return out.logits[:, -1, :].float()  # [1, V]

    def _head_rows(self, cache_position: torch.Tensor, n: int):
        """``min(S, k)`` as a value the graph computes (from the call's contiguous cache positions),
        when the output head is our kernel, which takes any number of rows: then a decode step's
        head computes and returns one row, not ``k`` of which ``k - 1`` are padding (what the
        padded form cost every plain decode step: 6-12% at k = 8). ``None`` for another head
        (XNNPACK delegates only a fixed-shape head GEMM, see :class:`_LastRows`)."""
        from .quantize import Q4Linear

        if not isinstance(self.model.get_output_embeddings(), Q4Linear):
            return None
        k = self.verify_tokens
        rows = torch.clamp(cache_position[-1] - cache_position[0] + 1, max=k).item()
        torch._check(rows >= 1)
        torch._check(rows <= k)
        torch._check(rows <= n)
        return rows


class _LastRows(nn.Module):
    """The output head applied to the last ``k`` positions of its input (zero rows before the
    first), or with ``rows`` (``min(S, k)``, computed in the graph) to the last ``rows`` positions.

    A static ``k`` keeps the head a fixed-shape GEMM that XNNPACK delegates (a data-dependent
    ``min(S, k)`` rows would leave it, and its dynamic quantization, to portable kernels); our own
    kernel's head takes ``rows``.
    """

    def __init__(self, head: nn.Module, k: int, rows=None):
        super().__init__()
        self.head = head
        self.k = k
        self.rows = rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        seq = hidden.shape[1]
        if self.rows is not None:
            return self.head(hidden.narrow(1, seq - self.rows, self.rows))
        padded = torch.cat([hidden.new_zeros(hidden.shape[0], self.k - 1, hidden.shape[2]), hidden], dim=1)
        return self.head(padded.narrow(1, seq - 1, self.k))  # positions S-k .. S-1


@contextlib.contextmanager
def _narrowed_head(model: nn.Module, k: int, rows=None):
    """Inside: ``model``'s output head computes the last ``k`` (or ``rows``) positions' logits only."""
    head = model.get_output_embeddings()
    owner, name = next(
        (mod, child_name)
        for mod in model.modules()
        for child_name, child in mod.named_children()
        if child is head
    )
    setattr(owner, name, _LastRows(head, k, rows))
    try:
        yield
    finally:
        setattr(owner, name, head)
