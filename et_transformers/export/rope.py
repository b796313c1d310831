"""RoPE's ``rotate_half`` as a matmul with a constant signed permutation, for export.

Transformers' ``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])`` slices a tensor whose sequence
length is dynamic, which XNNPACK cannot delegate: every layer's delegate would be cut twice (for
q and k). ``x @ P`` with ``P`` the matching signed permutation is the same result, exactly (each
output is one input times ±1 plus zeros) and XNNPACK runs it as a small GEMM.

The families' modeling modules each define a module-level ``rotate_half`` that their
``apply_rotary_pos_emb`` looks up at call time, so we swap that name while tracing. The matrices
live as (non-persistent) buffers of the exportable wrapper, one per rotary width, so
``torch.export`` lifts them as program constants like any other buffer.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn


def rotation_matrix(dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W`` such that ``F.linear(x, W) == rotate_half(x)`` for ``x[..., dim]``."""
    half = dim // 2
    eye = torch.eye(half, dtype=dtype)
    perm = torch.zeros(dim, dim, dtype=dtype)  # perm[out, in]
    perm[:half, half:] = -eye  # out[:half] = -x[half:]
    perm[half:, :half] = eye  # out[half:] = x[:half]
    return perm


def buffer_name(dim: int) -> str:
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


def matmul_rotate_half(owner: nn.Module, full_widths: set[int] = frozenset()):
    """A ``rotate_half`` that multiplies by ``owner``'s rotation buffer for the input's width.

    Args:
        owner: the module holding the rotation buffers.
        full_widths: head sizes; a narrower input is a partial-rotary slice (GPT-NeoX, Phi-4-mini)
            whose strides make ``torch.export`` guard on the sequence length inside ``linear``, so
            it is made contiguous first (a copy of the rotated part only).
    """

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        if width not in full_widths:
            x = x.contiguous()
        return torch.nn.functional.linear(x, getattr(owner, buffer_name(width)))

    return rotate_half
