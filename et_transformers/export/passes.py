"""Graph passes on the exported ATen program that let XNNPACK take whole decoder layers.

XNNPACK's partitioner refuses a ``view`` whose target shape holds a symbolic size (even when
``-1`` would say the same) and a ``mean`` that is not over the two innermost dims of a 4-D tensor.
Transformers code produces both in every layer (head reshapes, RMSNorm), and each refusal cuts a
delegate in two: more subgraphs, slower lowering, and a round trip through the portable runtime
at every cut. These passes rewrite them into equivalent forms XNNPACK accepts; they change no
numerics (``view`` with one inferred dim is the same view; a mean over ``[B, S, D, 1]``'s dims
(2, 3) is the same mean over ``D``). A third removes repeated dynamic quantization of one
activation (q/k/v and gate/up read the same hidden states), which changes no numerics either, and
a fourth drops transposes that undo each other (the values layout ``[B, S, H, D]`` -> ``[B, H, S, D]``
-> back, around the KV cache update and our RoPE kernel), each of which would be a copy.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.export import ExportedProgram

logger = logging.getLogger(__name__)

aten = torch.ops.aten


def infer_symbolic_view_dims(ep: ExportedProgram) -> int:
    """Give ``view``/``reshape`` target shapes static sizes and at most one inferred (``-1``) dim.

    The sizes are read off the node's output: every static output dim becomes its int, and the
    one dynamic dim (the sequence length) becomes ``-1``. Views with several dynamic dims are left
    alone.

    Returns:
        The number of nodes rewritten.
    """
    count = 0
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.view.default, aten.reshape.default):
            continue
        out = node.meta.get("val")
        shape = list(node.args[1])
        if out is None or len(out.shape) != len(shape):
            continue
        if all(isinstance(d, int) for d in shape) and shape.count(-1) <= 1:
            continue  # already fine for XNNPACK
        dynamic = [i for i, d in enumerate(out.shape) if not isinstance(d, int)]
        if len(dynamic) != 1:
            continue
        new_shape = [d if isinstance(d, int) else -1 for d in out.shape]
        node.args = (node.args[0], new_shape, *node.args[2:])
        count += 1
    return count


def mean_last_dim_as_4d(ep: ExportedProgram) -> int:
    """Rewrite ``mean(x[B, S, D], dim=-1, keepdim=True)`` as a 4-D mean over dims (2, 3).

    Returns:
        The number of nodes rewritten.
    """
    graph = ep.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.mean.dim:
            continue
        x, dims = node.args[0], list(node.args[1])
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if (
            val is None
            or val.dim() != 3
            or dims not in ([-1], [2])
            or not keepdim
            or node.kwargs.get("dtype") is not None
            or not isinstance(val.shape[0], int)
            or not isinstance(val.shape[-1], int)
        ):
            continue
        batch, width = val.shape[0], val.shape[-1]
        with graph.inserting_before(node):
            as_4d = graph.call_function(aten.view.default, (x, [batch, -1, width, 1]))
            mean = graph.call_function(aten.mean.dim, (as_4d, [2, 3], True))
            back = graph.call_function(aten.view.default, (mean, [batch, -1, 1]))
        # New nodes carry what later stages read: their fake values (ETRecord serialization needs
        # them) and the source location of the mean they replace (profiling attributes time by it).
        as_4d.meta["val"] = val.view(batch, -1, width, 1)
        mean.meta["val"] = as_4d.meta["val"].mean(dim=[2, 3], keepdim=True)
        back.meta["val"] = mean.meta["val"].view(batch, -1, 1)
        for new in (as_4d, mean, back):
            new.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
        node.replace_all_uses_with(back)
        graph.erase_node(node)
        count += 1
    return count


def share_activation_quantization(ep: ExportedProgram) -> int:
    """Quantize each activation once, however many linears read it.

    Dynamic quantization gives every linear its own ``choose_qparams -> quantize -> dequantize``
    chain, so q/k/v (and gate/up) quantize the same hidden states three (two) times: three XNNPACK
    convert operators, each reshaped, run and synchronised on every call. Identical chains (same
    input, same arguments) compute identical values, so later copies are replaced by the first.

    Returns:
        The number of nodes removed.
    """
    qd = torch.ops.quantized_decomposed
    targets = {
        qd.choose_qparams_per_token_asymmetric.default,
        qd.quantize_per_token.default,
        qd.dequantize_per_token.default,
        operator.getitem,
    }
    graph = ep.graph
    seen: dict[tuple, torch.fx.Node] = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        if node.target is operator.getitem and getattr(node.args[0], "target", None) not in targets:
            continue
        key = (node.target, tuple(node.args), tuple(sorted(node.kwargs.items())))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            removed += 1
    return removed


def cancel_transpose_pairs(ep: ExportedProgram) -> int:
    """Replace ``transpose(transpose(x, a, b), a, b)`` by ``x``.

    Returns:
        The number of pairs removed.
    """
    graph = ep.graph
    count = 0

    def dims(node: torch.fx.Node) -> frozenset[int] | None:
        val = node.meta.get("val")
        if val is None or len(node.args) != 3:
            return None
        rank = val.dim()
        return frozenset(int(d) % rank for d in node.args[1:])

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.transpose.int:
            continue
        inner = node.args[0]
        if not isinstance(inner, torch.fx.Node) or inner.target != aten.transpose.int:
            continue
        pair = dims(node)
        if pair is None or pair != dims(inner) or len(pair) != 2:
            continue
        node.replace_all_uses_with(inner.args[0])
        graph.erase_node(node)
        if not inner.users:
            graph.erase_node(inner)
        count += 1
    return count


def apply_xnnpack_friendly_rewrites(ep: ExportedProgram) -> ExportedProgram:
    """Run every pass of this module on ``ep`` in place and return it."""
    views = infer_symbolic_view_dims(ep)
    means = mean_last_dim_as_4d(ep)
    shared = share_activation_quantization(ep)
    transposes = cancel_transpose_pairs(ep)
    ep.graph_module.recompile()
    logger.debug("XNNPACK rewrites: %d views, %d means, %d repeated quantization nodes, %d transpose pairs",
                 views, means, shared, transposes)
    return ep
