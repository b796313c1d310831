"""Built-in source transforms: family-specific parts rewritten into exact, exportable equivalents.

They run on the transformers model before it is wrapped (:meth:`Exporter.source_transform`) and
change no numerics:

* :func:`conv1d_to_linear`: GPT-2's ``Conv1D`` (``x @ W + b`` with ``W`` stored ``[in, out]``)
  becomes an ``nn.Linear`` holding ``W.T``, so quantization and XNNPACK treat it like any other
  linear layer;
* :func:`traceable_dynamic_rope`: "dynamic" (NTK) RoPE recomputes its frequencies from the
  sequence length inside Python control flow that ``torch.export`` cannot trace; the rewrite
  computes both frequency sets in the graph and picks one with ``torch.where``, exactly as
  transformers' ``generate()`` does for a growing sequence.
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


def _dynamic_forward(module: nn.Module):
    """A forward for ``module`` computing dynamic-NTK frequencies in the graph."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw_forward = inspect.unwrap(type(module).forward)  # without transformers' dynamic_rope_update
    rope_types = _rope_types(module)

    def forward(x, position_ids, layer_type=None):
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        rope_type = rope_types.get(layer_type)
        if rope_type is None or "dynamic" not in rope_type:
            return raw_forward(module, x, position_ids, **kwargs)
        prefix = "" if layer_type is None else f"{layer_type}_"
        # transformers: past the original context the frequencies are recomputed for
        # seq_len = max(position) + 1 (the sequence grows one token per call in generate()).
        seq_len = torch.max(position_ids) + 1
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


def traceable_dynamic_rope(model: nn.Module) -> int:
    """Give every rotary embedding of ``model`` with a "dynamic" rope type a traceable forward.

    Returns:
        The number of rotary modules rewritten.
    """
    count = 0
    for module in model.modules():
        types = _rope_types(module)
        if any(t and "dynamic" in t for t in types.values()) and hasattr(module, "original_max_seq_len"):
            module.forward = _dynamic_forward(module)
            count += 1
    return count


def apply_builtin_transforms(model: nn.Module) -> nn.Module:
    """Apply every transform of this module to ``model`` (in place) and return it."""
    convs = conv1d_to_linear(model)
    ropes = traceable_dynamic_rope(model)
    if convs or ropes:
        logger.info("Source transforms: %d Conv1D -> Linear, %d dynamic RoPE made traceable", convs, ropes)
    return model
