"""Built-in source transforms: family-specific parts rewritten into exact, exportable equivalents.

They run on the transformers model before it is wrapped (:meth:`Exporter.source_transform`) and
change no numerics:

* :func:`conv1d_to_linear`: GPT-2's ``Conv1D`` (``x @ W + b`` with ``W`` stored ``[in, out]``)
  becomes an ``nn.Linear`` holding ``W.T``, so quantization and XNNPACK treat it like any other
  linear layer;
* :func:`traceable_dynamic_rope`: "dynamic" (NTK) RoPE recomputes its frequencies from the
  sequence length inside Python control flow that ``torch.export`` cannot trace; the rewrite
  computes both frequency sets in the graph and picks one with ``torch.where``, exactly as
  transformers' ``generate()`` does for a growing sequence, row by row in calls past position 0
  (so a verified draft is computed as its one-token steps would be).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` in ``model`` by the equivalent ``nn.Linear``.

    Returns:
        The number of layers replaced.
    """
    from transformers.pytorch_utils import Conv1D

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in targets:
        in_features, out_features = conv.weight.shape
        linear = nn.Linear(in_features, out_features, bias=conv.bias is not None,
                           dtype=conv.weight.dtype, device=conv.weight.device)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(targets)


def _rope_types(module: nn.Module) -> dict[str | None, str]:
    """``{layer_type or None: rope_type}`` of a transformers rotary-embedding module."""
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict):
        return dict(rope_type)
    return {None: rope_type} if isinstance(rope_type, str) else {}


def _dynamic_forward(module: nn.Module, per_row: bool = True):
    """A forward for ``module`` computing dynamic-NTK frequencies in the graph.

    transformers recomputes the frequencies for ``seq_len = max(position) + 1`` of each call, the
    sequence growing one token per call in ``generate()``. A call that starts at position 0 (a
    prefill) does that here too. With ``per_row``, a call that starts later (a decode step, or a
    draft being verified) gives each row its own ``position + 1``: what the one-token calls of
    plain decoding would have used, so a verified draft's rows and its cache entries equal plain
    decoding's. Without it, every row takes the call's ``max + 1``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw_forward = inspect.unwrap(type(module).forward)  # without transformers' dynamic_rope_update
    rope_types = _rope_types(module)

    def forward(x, position_ids, layer_type=None):
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        rope_type = rope_types.get(layer_type)
        if rope_type is None or "dynamic" not in rope_type:
            return raw_forward(module, x, position_ids, **kwargs)
        prefix = "" if layer_type is None else f"{layer_type}_"
        seq_len = torch.max(position_ids) + 1
        if per_row:
            seq_len = torch.where(torch.min(position_ids) == 0, seq_len, position_ids + 1)[..., None]
        grown, _ = ROPE_INIT_FUNCTIONS[rope_type](module.config, x.device, seq_len=seq_len, **kwargs)
        original = getattr(module, f"{prefix}original_inv_freq")
        inv_freq = torch.where(seq_len > module.original_max_seq_len, grown, original)
        name = f"{prefix}inv_freq"
        saved = module._buffers[name]
        module._buffers[name] = inv_freq
        try:
            return raw_forward(module, x, position_ids, **kwargs)
        finally:
            module._buffers[name] = saved

    return forward


def _rows_alike(module: nn.Module, per_row, call_wide) -> bool:
    """Whether ``module``'s own forward takes per-row frequencies: a one-token call past the
    original context must give the same values both ways (a forward that indexes its frequencies
    as one vector fails or differs)."""
    types = [t for t in _rope_types(module).items() if t[1] and "dynamic" in t[1]]
    layer_type = types[0][0] if types else None
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    position = torch.tensor([[int(module.original_max_seq_len) + 5]])
    x = torch.zeros(1, 1, 1)
    try:
        with torch.no_grad():
            got, want = per_row(x, position, **kwargs), call_wide(x, position, **kwargs)
    except (RuntimeError, IndexError, ValueError):
        return False
    return all(torch.equal(a, b) for a, b in zip(got, want))


def traceable_dynamic_rope(model: nn.Module) -> int:
    """Give every rotary embedding of ``model`` with a "dynamic" rope type a traceable forward.

    Returns:
        The number of rotary modules rewritten.
    """
    count = 0
    for module in model.modules():
        types = _rope_types(module)
        if any(t and "dynamic" in t for t in types.values()) and hasattr(module, "original_max_seq_len"):
            per_row, call_wide = _dynamic_forward(module), _dynamic_forward(module, per_row=False)
            if _rows_alike(module, per_row, call_wide):
                module.forward = per_row
            else:
                logger.warning(
                    "%s's forward takes one frequency vector per call: a verified draft's rows get the "
                    "call's frequencies, so assisted greedy output can differ from plain greedy output "
                    "past the original context (%d positions)", type(module).__name__, module.original_max_seq_len)
                module.forward = call_wide
            count += 1
    return count


def apply_builtin_transforms(model: nn.Module) -> nn.Module:
    """Apply every transform of this module to ``model`` (in place) and return it."""
    convs = conv1d_to_linear(model)
    ropes = traceable_dynamic_rope(model)
    if convs or ropes:
        logger.info("Source transforms: %d Conv1D -> Linear, %d dynamic RoPE made traceable", convs, ropes)
    return model
