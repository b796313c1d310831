"""PyTorch definitions of our ExecuTorch kernels' operators, with bit-exact reference implementations.

``et_transformers::q4_linear(x, qweight, scales)`` is ``x @ W.T`` for 4-bit weights stored in the
layout :func:`pack_q4` builds, with the activations quantized to int8 per block of 32 (llama.cpp's
Q4_0 x Q8_0 arithmetic). The reference below performs the same float operations in the same
order as the C++ kernel (``q4_linear.cpp``): int8 blocks from ``round(x * (1 / (max|x| / 127)))``,
exact integer block dots, then ``acc = acc + dot_b * (weight_scale_b * act_scale_b)`` over the
blocks in order, so an exported program and its eager model give the same logits. The ``.out``
overload is the one ExecuTorch's emitter calls.

``et_transformers::q4_linear_per_token(x, qweight, scales, weight_sums)`` is the same weights with
torchao's ``8da4w`` activations (what XNNPACK's dynamically quantized linear takes): each row of
``x`` quantized to int8 with one scale ``s`` and zero point ``z``, by ``quantized_decomposed``'s own
``choose_qparams_per_token_asymmetric`` and ``quantize_per_token`` (the reference calls them; the
kernel repeats their float operations), then the same exact integer block dots and
``acc = acc + dot_b * (weight_scale_b * s)``, and last ``acc - (s * z) * weight_sums`` with
``weight_sums`` (:func:`weight_sums`) the per-output sum of each block's scale times its int4
values: the zero point's term. An all-zero row gives +0 in both ops.

``et_transformers::sdpa(q, k_cache, v_cache, start_pos, scale)`` is causal attention of ``q``
``[B, S, H, D]`` over a static cache ``[B, T, Hkv, D]`` (query ``s`` sees positions up to
``start_pos + s``), ``llama.custom_sdpa``'s contract without a mask; its reference is plain float32
softmax attention, which the kernel matches to float rounding (not bit for bit: it sums in
another order and has its own ``exp``).

The layer operators run what sits between a decoder layer's GEMMs (``layer_ops.cpp``):
``rms_norm(x, weight, eps, unit_offset)`` is transformers' RMSNorm (``1 + weight`` for Gemma's
form), ``rope(x, cos, sin)`` is ``apply_rotary_pos_emb`` for ``x`` in ``[B, S, H, D]`` order with
``cos``/``sin`` ``[B, S, D]`` (bit for bit: the same products and sums), and ``silu_mul(gate, up)``
is ``silu(gate) * up``. Their references are the transformers formulas; the kernels match
``rms_norm`` and ``silu_mul`` to float rounding (another summation order, their own ``exp``).
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32
ROWS = 8
#: activation rows the reference processes at once (bounds its temporaries)
_CHUNK_ROWS = 256

_lib = torch.library.Library("et_transformers", "DEF")
_lib.define("q4_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor")
_lib.define("q4_linear.out(Tensor x, Tensor qweight, Tensor scales, *, Tensor(a!) out) -> Tensor(a!)")
_lib.define("q4_linear_per_token(Tensor x, Tensor qweight, Tensor scales, Tensor weight_sums) -> Tensor")
_lib.define(
    "q4_linear_per_token.out(Tensor x, Tensor qweight, Tensor scales, Tensor weight_sums, *, Tensor(a!) out) -> Tensor(a!)"
)
_lib.define("sdpa(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, float scale) -> Tensor")
_lib.define(
    "sdpa.out(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, float scale, *, Tensor(a!) out) -> Tensor(a!)"
)

_lib.define("rms_norm(Tensor x, Tensor weight, float eps, bool unit_offset) -> Tensor")
_lib.define("rms_norm.out(Tensor x, Tensor weight, float eps, bool unit_offset, *, Tensor(a!) out) -> Tensor(a!)")
_lib.define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor")
_lib.define("rope.out(Tensor x, Tensor cos, Tensor sin, *, Tensor(a!) out) -> Tensor(a!)")
_lib.define("silu_mul(Tensor gate, Tensor up) -> Tensor")
_lib.define("silu_mul.out(Tensor gate, Tensor up, *, Tensor(a!) out) -> Tensor(a!)")


def packable(out_features: int, in_features: int) -> bool:
    """Whether a ``[out, in]`` weight fits the kernel's layout (rows in eights, inputs in 32s)."""
    return out_features % ROWS == 0 and in_features % BLOCK == 0


def pack_q4(qdata: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Pack symmetric int4 weights for the kernel.

    Args:
        qdata: ``[N, K]`` integer values in ``[-8, 7]``.
        scale: ``[N, K // 32]`` float scales (stored as float16).

    Returns:
        ``qweight`` uint8 ``[N/8, K/32, 128]``: per group of 8 rows and block of 32 inputs, 4 chunks
        of 32 bytes, byte ``4r + t`` of chunk ``c`` holding row ``r``'s input ``4c + t`` (+ 8) in its
        low nibble and input ``16 + 4c + t`` (+ 8) in its high one (so the kernel finds 8 rows' 4
        consecutive inputs in each 32-bit lane); ``scales`` float16 ``[N/8, K/32, 8]``.
    """
    n, k = qdata.shape
    if not packable(n, k):
        raise ValueError(f"q4 packing needs out_features % {ROWS} == 0 and in_features % {BLOCK} == 0, got [{n}, {k}]")
    if scale.shape != (n, k // BLOCK):
        raise ValueError(f"expected scales of shape [{n}, {k // BLOCK}], got {list(scale.shape)}")
    g, b = n // ROWS, k // BLOCK
    u = (qdata.to(torch.int16) + 8).to(torch.uint8).view(g, ROWS, b, 2, 4, 4)  # [G, r, B, half, c, t]
    packed = u[:, :, :, 0] | (u[:, :, :, 1] << 4)  # [G, r, B, c, t]
    qweight = packed.permute(0, 2, 3, 1, 4).reshape(g, b, ROWS * BLOCK // 2).contiguous()
    scales = scale.to(torch.float16).view(g, ROWS, b).permute(0, 2, 1).contiguous()
    return qweight, scales


def unpack_q4(qweight: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`pack_q4`: ``[N, K]`` int8 values and ``[N, K/32]`` float16 scales."""
    g, b = qweight.shape[:2]
    chunks = qweight.view(g, b, 4, ROWS, 4)  # [G, B, c, r, t]
    values = torch.stack((chunks & 0x0F, chunks >> 4), dim=3).to(torch.int8) - 8  # [G, B, c, half, r, t]
    qdata = values.permute(0, 4, 1, 3, 2, 5).reshape(g * ROWS, b * BLOCK)  # [G, r, B, half, c, t]
    return qdata, scales.permute(0, 2, 1).reshape(g * ROWS, b)


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per block of 32 along the last dim: int8-valued floats ``[M, B, 32]`` and scales ``[M, B]``."""
    blocks = x.reshape(-1, x.shape[-1] // BLOCK, BLOCK).float()
    d = blocks.abs().amax(dim=-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(blocks * inv.unsqueeze(-1)), d


def weight_sums(qweight: Tensor, scales: Tensor) -> Tensor:
    """``q4_linear_per_token``'s ``weight_sums``: float32 ``[N]``, per output row the sum over its
    blocks of the block's (float16) scale times the sum of its int4 values, summed in float64."""
    qdata, wscale = unpack_q4(qweight, scales)
    n, k = qdata.shape
    block_sums = qdata.to(torch.float64).view(n, k // BLOCK, BLOCK).sum(-1)
    return (block_sums * wscale.to(torch.float64)).sum(-1).float()


def quantize_activations_per_token(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``quantized_decomposed``'s per-token asymmetric int8 of ``x`` ``[..., K]`` as rows: int8-valued
    floats ``[M, B, 32]``, scales ``[M, B]`` (the row's scale in every block; 0 for an all-zero
    row) and ``s * z`` per row ``[M]``."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

    qd = torch.ops.quantized_decomposed
    rows = x.reshape(-1, x.shape[-1]).float()
    scale, zero = qd.choose_qparams_per_token_asymmetric(rows, torch.int8)
    xq = qd.quantize_per_token(rows, scale, zero, -128, 127, torch.int8)
    s = scale.float().view(-1)
    zc = s * zero.float().view(-1)
    nonzero = (rows != 0).any(dim=-1)
    s, zc = torch.where(nonzero, s, 0.0), torch.where(nonzero, zc, 0.0)
    nb = rows.shape[-1] // BLOCK
    return xq.float().view(-1, nb, BLOCK), s.unsqueeze(1).expand(-1, nb), zc


def q4_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, sums: Tensor | None = None) -> Tensor:
    """What the C++ kernel computes, bit for bit (see the module docstring): ``q4_linear``, or with
    ``sums`` (``weight_sums``) ``q4_linear_per_token``."""
    qdata, wscale = unpack_q4(qweight, scales)
    n, k = qdata.shape
    if x.shape[-1] != k:
        raise ValueError(f"q4_linear: x's last dim is {x.shape[-1]}, the weight's input size is {k}")
    nb = k // BLOCK
    w = qdata.float().view(n, nb, BLOCK)
    ws = wscale.float()  # [N, B]
    if sums is None:
        xq, xs = quantize_activations(x)
    else:
        xq, xs, zc = quantize_activations_per_token(x)
    rows = xq.shape[0]
    out = torch.empty(rows, n, dtype=torch.float32)
    for start in range(0, rows, _CHUNK_ROWS):
        part_q, part_s = xq[start : start + _CHUNK_ROWS], xs[start : start + _CHUNK_ROWS]
        acc = torch.zeros(part_q.shape[0], n, dtype=torch.float32)
        for b in range(nb):
            dot = part_q[:, b] @ w[:, b].T  # integers below 2**24: exact in any order
            acc = acc + dot * (ws[:, b].unsqueeze(0) * part_s[:, b].unsqueeze(1))
        if sums is not None:
            acc = acc - zc[start : start + _CHUNK_ROWS].unsqueeze(1) * sums.float().unsqueeze(0)
        out[start : start + part_q.shape[0]] = acc
    return out.view(*x.shape[:-1], n).to(x.dtype)


@torch.library.impl(_lib, "q4_linear", "CompositeExplicitAutograd")
def _q4_linear(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    return q4_linear_reference(x, qweight, scales)


@torch.library.impl(_lib, "q4_linear.out", "CompositeExplicitAutograd")
def _q4_linear_out(x: Tensor, qweight: Tensor, scales: Tensor, *, out: Tensor) -> Tensor:
    result = q4_linear_reference(x, qweight, scales)
    out.resize_(result.shape)
    return out.copy_(result)


@torch.library.register_fake("et_transformers::q4_linear")
def _q4_linear_fake(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0] * ROWS))


@torch.library.impl(_lib, "q4_linear_per_token", "CompositeExplicitAutograd")
def _q4_linear_per_token(x: Tensor, qweight: Tensor, scales: Tensor, weight_sums: Tensor) -> Tensor:
    return q4_linear_reference(x, qweight, scales, weight_sums)


@torch.library.impl(_lib, "q4_linear_per_token.out", "CompositeExplicitAutograd")
def _q4_linear_per_token_out(x: Tensor, qweight: Tensor, scales: Tensor, weight_sums: Tensor, *, out: Tensor) -> Tensor:
    result = q4_linear_reference(x, qweight, scales, weight_sums)
    out.resize_(result.shape)
    return out.copy_(result)


@torch.library.register_fake("et_transformers::q4_linear_per_token")
def _q4_linear_per_token_fake(x: Tensor, qweight: Tensor, scales: Tensor, weight_sums: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0] * ROWS))


def sdpa_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: int, scale: float) -> Tensor:
    """Causal softmax attention over the cache's first ``start_pos + S`` positions (float32)."""
    s_len, heads, kv_heads = q.shape[1], q.shape[2], k_cache.shape[2]
    n = int(start_pos) + s_len
    k = k_cache[:, :n].float().repeat_interleave(heads // kv_heads, dim=2)
    v = v_cache[:, :n].float().repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q.float(), k) * scale
    allowed = torch.arange(n).view(1, n) <= (int(start_pos) + torch.arange(s_len)).view(s_len, 1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhst,bthd->bshd", scores.softmax(dim=-1), v).to(q.dtype)


@torch.library.impl(_lib, "sdpa", "CompositeExplicitAutograd")
def _sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: int, scale: float) -> Tensor:
    return sdpa_reference(q, k_cache, v_cache, start_pos, scale)


@torch.library.impl(_lib, "sdpa.out", "CompositeExplicitAutograd")
def _sdpa_out(q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: int, scale: float, *, out: Tensor) -> Tensor:
    result = sdpa_reference(q, k_cache, v_cache, start_pos, scale)
    out.resize_(result.shape)
    return out.copy_(result)


@torch.library.register_fake("et_transformers::sdpa")
def _sdpa_fake(q: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: int, scale: float) -> Tensor:
    return torch.empty_like(q)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, unit_offset: bool) -> Tensor:
    """Transformers' RMSNorm in float32: ``x * rsqrt(mean(x**2) + eps) * w`` (``w = 1 + weight``
    when ``unit_offset``)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = 1.0 + weight.float() if unit_offset else weight.float()
    return (normed * w).to(x.dtype)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` ``[B, S, H, D]`` and ``cos``/``sin`` ``[B, S, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``."""
    return torch.nn.functional.silu(gate) * up


def _define(name: str, reference, fake) -> None:
    """Register ``reference`` as the eager kernel of ``name`` and its ``.out`` overload, and ``fake``."""

    def out_overload(*args, out: Tensor) -> Tensor:
        result = reference(*args)
        out.resize_(result.shape)
        return out.copy_(result)

    torch.library.impl(_lib, name, "CompositeExplicitAutograd")(reference)
    torch.library.impl(_lib, f"{name}.out", "CompositeExplicitAutograd")(out_overload)
    torch.library.register_fake(f"et_transformers::{name}")(fake)


_define("rms_norm", rms_norm_reference, lambda x, weight, eps, unit_offset: torch.empty_like(x))
_define("rope", rope_reference, lambda x, cos, sin: torch.empty_like(x))
_define("silu_mul", silu_mul_reference, lambda gate, up: torch.empty_like(gate))
