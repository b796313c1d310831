"""RoPE's ``rotate_half`` as elementwise ops and a pairwise mean that XNNPACK delegates, for export.

Transformers' ``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])`` slices a tensor whose sequence
length is dynamic, which XNNPACK cannot delegate: every layer's delegate would be cut twice (for
q and k). We compute the same values from the pairs ``(x[h], x[h + d/2])`` instead: a broadcast
multiply by a constant ``[2, 2, 1]`` of ``±2`` and zeros puts ``2 * sign * partner`` beside a zero
for each output, and a mean over each such pair (XNNPACK's global average pooling of a
``[M, d, 2, 1]`` view of the products) halves it back. Every step is exact: products by ±2 and 0,
a sum with zero, a halving.

Half-precision programs keep the older form, a multiply by a signed permutation matrix (one
small GEMM each for q and k, exact too): XNNPACK pools float32 only. In float32 programs that form
cost a lot of speed: XNNPACK runs float GEMMs with assembly kernels that return without
``vzeroupper``, so the thread pool's worker entered ``llama.custom_sdpa``'s SSE code with dirty
upper AVX state, and attention cost 3-4x more at two threads than at one (issue 14's decode gap).
The elementwise, transpose and pooling kernels are compiled C, which clears that state on return.

The families' modeling modules each define a module-level ``rotate_half`` that their
``apply_rotary_pos_emb`` looks up at call time, so we swap that name while tracing. The constants
(the pair signs, or one rotation matrix per rotary width) live as non-persistent buffers of the
exportable wrapper, so ``torch.export`` lifts them as program constants like any other buffer.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn


BUFFER_NAME = "rope_pair_signs"


def pair_signs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[2, 2, 1]`` constant ``C[j, i, 0]``: ``2 * s_i`` where ``j == 1 - i`` (``s = (-1, +1)``), else 0.

    Output half ``i`` of ``rotate_half`` is ``s_i`` times input half ``j = 1 - i``; the factor 2
    undoes the mean over the pair ``(term, 0)``.
    """
    signs = torch.zeros(2, 2, 1, dtype=dtype)
    signs[1, 0, 0] = -2.0  # out[:half] = -x[half:]
    signs[0, 1, 0] = 2.0  # out[half:] = x[:half]
    return signs


def rotation_matrix(dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W`` such that ``F.linear(x, W) == rotate_half(x)`` for ``x[..., dim]`` (half-precision programs)."""
    half = dim // 2
    eye = torch.eye(half, dtype=dtype)
    perm = torch.zeros(dim, dim, dtype=dtype)  # perm[out, in]
    perm[:half, half:] = -eye  # out[:half] = -x[half:]
    perm[half:, :half] = eye  # out[half:] = x[:half]
    return perm


def matrix_name(dim: int) -> str:
    """Name of the wrapper buffer holding the rotation matrix for width ``dim``."""
    return f"rope_rotation_{dim}"


def modeling_module(model: nn.Module):
    """The python module that defines ``model``'s class (where its ``rotate_half`` lives)."""
    return sys.modules[type(model).__module__]


@contextlib.contextmanager
def swap_rotate_half(model: nn.Module, replacement: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[bool]:
    """Within the block, ``model``'s family calls ``replacement`` instead of its ``rotate_half``.

    Yields:
        Whether the family has a ``rotate_half`` to swap (GPT-2, for one, has no rotary embedding).
    """
    module = modeling_module(model)
    original = getattr(module, "rotate_half", None)
    if original is None:
        yield False
        return
    module.rotate_half = replacement
    try:
        yield True
    finally:
        module.rotate_half = original


def recording_rotate_half(model: nn.Module, widths: set[int]):
    """A ``rotate_half`` that records the widths it is called with and then does the original."""
    original = modeling_module(model).rotate_half

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        widths.add(int(x.shape[-1]))
        return original(x)

    return rotate_half


def pairwise_rotate_half(owner: nn.Module):
    """A ``rotate_half`` built from ``owner``'s pair-sign buffer: multiply, then mean over pairs.

    Args:
        owner: the module holding the :data:`BUFFER_NAME` buffer.
    """

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        width, half = x.shape[-1], x.shape[-1] // 2
        # q and k arrive transposed; one small copy lets every later step be a plain view, with
        # one dynamic dim and static unit dims (what XNNPACK's view, multiply and pooling take).
        x = x.contiguous()
        # terms[m, j, i, h] = 2 * s_i * x[m, j * half + h] where j == 1 - i, else 0
        terms = x.view(-1, 2, 1, half) * getattr(owner, BUFFER_NAME)
        # as NCHW [m, (i, h), j, 1]: the pooling averages each output's pair (term, 0)
        pairs = terms.view(-1, 2, 1, width).permute(0, 3, 1, 2)
        return pairs.mean(dim=(2, 3), keepdim=True).view(x.shape)

    return rotate_half


def matmul_rotate_half(owner: nn.Module, full_widths: set[int] = frozenset()):
    """A ``rotate_half`` that multiplies by ``owner``'s rotation matrix for the input's width.

    For bf16 and fp16 programs, whose pooling XNNPACK does not run (a bf16 program with the
    pairwise form fails to initialise) and whose partitions the pairwise form cuts.

    Args:
        owner: the module holding the :func:`matrix_name` buffers.
        full_widths: head sizes; a narrower input is a partial-rotary slice (GPT-NeoX, Phi-4-mini)
            whose strides make ``torch.export`` guard on the sequence length inside ``linear``, so
            it is made contiguous first (a copy of the rotated part only).
    """

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        if width not in full_widths:
            x = x.contiguous()
        return torch.nn.functional.linear(x, getattr(owner, matrix_name(width)))

    return rotate_half
