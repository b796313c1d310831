"""Source transforms for programs built with our kernels: a decoder layer's small ops as our operators.

In a ``q4_0`` program our kernels run the GEMMs and attention, and what sits between them (RMSNorm,
RoPE, ``silu(gate) * up``) would otherwise become XNNPACK delegates: four or five per layer, each
a few microseconds of work behind a delegate call that costs ~25 us at two threads, because XNNPACK
lets the thread pool's workers sleep after every call and the next parallel op has to wake them
(measured: ~160 futex calls per decode step). Here those parts of the transformers model call
``et_transformers::rms_norm``, ``::rope`` and ``::silu_mul`` instead (serial kernels, see
``kernels/layer_ops.cpp``), so a decode step has no delegate between its GEMMs.

Each rewrite is chosen by behaviour, not by class name: a module (or the family's
``apply_rotary_pos_emb``) is replaced only after our operator's reference reproduces its output on
a probe input (bit for bit for RoPE; to float rounding for RMSNorm and the MLP, whose kernels sum in
another order). Anything else (LayerNorm, GELU MLPs, interleaved or partial RoPE) is left as it is.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator

import torch
from torch import nn

from . import rope

logger = logging.getLogger(__name__)

_PROBE_SEED = 0


def _probe(*shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.randn(*shape, generator=generator)


def _norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (float, int)) else None


def _rms_norm_form(module: nn.Module) -> bool | None:
    """``unit_offset`` of the RMSNorm ``module`` computes (``None``: not an RMSNorm we can run)."""
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    eps = _norm_eps(module)
    if set(params) != {"weight"} or weight.dim() != 1 or eps is None or list(module.children()):
        return None
    x = _probe(2, 3, weight.shape[0])
    with torch.no_grad():
        try:
            expected = module(x)
        except Exception:  # noqa: BLE001  (a module that cannot take this input is not an RMSNorm)
            return None
        for unit_offset in (False, True):
            ours = torch.ops.et_transformers.rms_norm(x, weight.float(), eps, unit_offset)
            if expected.shape == ours.shape and torch.allclose(expected, ours, rtol=1e-5, atol=1e-6):
                return unit_offset
    return None


def _rms_norm_forward(module: nn.Module, unit_offset: bool):
    eps = _norm_eps(module)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.et_transformers.rms_norm(hidden_states, self.weight, eps, unit_offset)

    return types.MethodType(forward, module)


def fuse_rms_norms(model: nn.Module) -> int:
    """Run every RMSNorm of ``model`` as ``et_transformers::rms_norm``; returns how many."""
    from ..kernels import ops  # noqa: F401  (defines the operators)

    count = 0
    for module in model.modules():
        form = _rms_norm_form(module)
        if form is not None:
            module.forward = _rms_norm_forward(module, form)
            count += 1
    return count


def _gated_silu_mlp(module: nn.Module) -> bool:
    """Whether ``module`` computes ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""
    gate, up, down = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if not all(isinstance(m, nn.Linear) for m in (gate, up, down)):
        return False
    x = _probe(1, 3, gate.in_features)
    with torch.no_grad():
        try:
            expected = module(x)
        except Exception:  # noqa: BLE001  (not the MLP shape we know)
            return False
        ours = down(torch.ops.et_transformers.silu_mul(gate(x), up(x)))
    return expected.shape == ours.shape and torch.allclose(expected, ours, rtol=1e-4, atol=1e-6)


def _silu_mul_forward(module: nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.ops.et_transformers.silu_mul(self.gate_proj(x), self.up_proj(x)))

    return types.MethodType(forward, module)


def fuse_silu_mul(model: nn.Module) -> int:
    """Run every gated-SiLU MLP of ``model`` through ``et_transformers::silu_mul``; returns how many."""
    from ..kernels import ops  # noqa: F401

    count = 0
    for module in model.modules():
        if _gated_silu_mlp(module):
            module.forward = _silu_mul_forward(module)
            count += 1
    return count


def apply_layer_ops(model: nn.Module) -> nn.Module:
    """:func:`fuse_rms_norms` and :func:`fuse_silu_mul` on ``model`` (in place); returns it."""
    norms, mlps = fuse_rms_norms(model), fuse_silu_mul(model)
    logger.info("Our layer kernels: %d RMSNorm, %d SiLU-gated MLP", norms, mlps)
    return model


def _own_rotary(original):
    """``apply_rotary_pos_emb`` through ``et_transformers::rope`` for full-width float32 rotations
    (q/k arrive ``[B, H, S, D]``; the transposes around the kernel cancel against the model's)."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1 or cos.dim() != 3 or cos.shape[-1] != q.shape[-1] or q.dtype != torch.float32:
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        op = torch.ops.et_transformers.rope
        return op(q.transpose(1, 2), cos, sin).transpose(1, 2), op(k.transpose(1, 2), cos, sin).transpose(1, 2)

    return apply_rotary_pos_emb


@contextlib.contextmanager
def own_rotary(model: nn.Module, head_dims: set[int]) -> Iterator[bool]:
    """Within the block, ``model``'s family applies RoPE with ``et_transformers::rope``, if the
    family's ``apply_rotary_pos_emb`` gives our kernel's values bit for bit on a probe.

    Yields:
        Whether the swap is in place.
    """
    from ..kernels import ops  # noqa: F401

    module = rope.modeling_module(model)
    original = getattr(module, "apply_rotary_pos_emb", None)
    ours = _own_rotary(original) if original is not None else None
    if ours is None or not all(_same_rotation(original, ours, d) for d in head_dims):
        yield False
        return
    module.apply_rotary_pos_emb = ours
    try:
        yield True
    finally:
        module.apply_rotary_pos_emb = original


def _same_rotation(original, ours, dim: int) -> bool:
    q, k = _probe(1, 4, 3, dim), _probe(1, 2, 3, dim) * 0.5
    cos, sin = _probe(1, 3, dim).cos(), _probe(1, 3, dim).sin()
    try:
        with torch.no_grad():
            expected, got = original(q, k, cos, sin), ours(q, k, cos, sin)
    except Exception:  # noqa: BLE001  (a signature we do not know: keep the family's)
        return False
    return all(torch.equal(e, g) for e, g in zip(expected, got))
