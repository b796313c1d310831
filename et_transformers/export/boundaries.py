"""Delegate boundaries a runtime can bind: partitioning that keeps ``SymInt`` and 0-d values inside.

Our programs read the start position as ``cache_position[0].item()``: a 0-d tensor, then an
unbacked ``SymInt``, which ``llama.update_cache`` and ``llama.custom_sdpa`` take. Partitioners that
claim every operator they support also claim those nodes, and then pass the ``SymInt`` or the 0-d
tensor across a delegate boundary, which neither OpenVINO (``'SymInt' object has no attribute
'type'``; a rank-0 delegate input fails with Internal, 0x1) nor coremltools (``Placeholder val must
be a tensor or fake tensor, but got type <class 'torch.SymInt'>``) can take.

:func:`propose_bindable_partitions` wraps a backend's operator support: it never delegates a
``SymInt``-valued node, and leaves to ExecuTorch every node that would pass a 0-d tensor across a
delegate boundary, repartitioning until none does. A 0-d value read only inside its delegate
(NNCF's scalar zero points) stays. :func:`tag_bindable_partitions` tags those partitions for a
backend's delegation spec; :class:`BindablePartitioner`, the base of :mod:`.openvino`'s and
:mod:`.coreml`'s partitioners, wraps a backend's own partitioner around it.
"""

from __future__ import annotations

import logging
import operator

import torch
from executorch.exir.backend.partitioner import Partitioner, PartitionResult
from executorch.exir.backend.utils import tag_constant_data
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner, Partition
from torch.fx.passes.operator_support import OperatorSupportBase


def _outputs(node: torch.fx.Node) -> list:
    value = node.meta.get("val")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _bindable(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


class _TensorSupport(OperatorSupportBase):
    """``backend_support`` minus nodes with a non-tensor output (``SymInt``) and the nodes in ``banned``."""

    def __init__(self, backend_support: OperatorSupportBase, banned: set[str]):
        self.backend_support = backend_support
        self.banned = banned

    def is_node_supported(self, submodules, node: torch.fx.Node) -> bool:
        return (node.name not in self.banned and all(isinstance(v, torch.Tensor) for v in _outputs(node))
                and self.backend_support.is_node_supported(submodules, node))


def unbindable_boundaries(partitions) -> set[str]:
    """Nodes of ``partitions`` that would pass a 0-d tensor across their delegate's boundary: ones
    that read such a value from outside, or write one that is read outside. (Parameters and
    constants go into the delegate, so placeholders are not boundaries; a 0-d value whose readers
    are all in the same delegate is fine.)

    Args:
        partitions: proposed partitions (``torch.fx`` ``Partition``\\ s, with ``.nodes``).

    Returns:
        The names of the offending nodes.
    """
    offenders = set()
    for partition in partitions:
        inside = set(partition.nodes)
        for node in inside:
            reads = [n for n in node.all_input_nodes if n not in inside and n.op != "placeholder"]
            # a getitem inside reads one element of an outside tuple: that element (its own output) crosses
            crossing = [_outputs(node)] if node.target is operator.getitem else [_outputs(n) for n in reads]
            if reads and not all(_bindable(v) for values in crossing for v in values):
                offenders.add(node.name)
            if any(user not in inside for user in node.users) and not all(map(_bindable, _outputs(node))):
                offenders.add(node.name)
    return offenders


def propose_bindable_partitions(
    gm: torch.fx.GraphModule, backend_support: OperatorSupportBase
) -> tuple[list[Partition], set[str]]:
    """Partition ``gm`` as ``backend_support`` allows, minus ``SymInt``-valued nodes and nodes at 0-d
    boundaries (see the module docstring).

    Args:
        gm: the edge program's graph module.
        backend_support: the backend's own operator support.

    Returns:
        The partitions (one per connected group of supported nodes), and the names of the nodes
        left to ExecuTorch because they sat at a 0-d boundary.
    """
    banned: set[str] = set()
    while True:  # banned only grows, so this ends
        partitions = CapabilityBasedPartitioner(
            gm, _TensorSupport(backend_support, banned), allows_single_node_partition=True
        ).propose_partitions()
        offenders = unbindable_boundaries(partitions)
        if not offenders:
            return partitions, banned
        banned |= offenders


def tag_bindable_partitions(exported_program, backend_support: OperatorSupportBase, delegation_spec,
                            tag_prefix: str) -> tuple[PartitionResult, set[str]]:
    """Tag the partitions of :func:`propose_bindable_partitions` for ``delegation_spec``, and the
    constants they read (weights go into the delegates).

    Args:
        exported_program: the edge program to tag in place.
        backend_support: the backend's own operator support.
        delegation_spec: the backend's ``DelegationSpec`` (its id and compile specs).
        tag_prefix: the tags' prefix (``"coreml"`` gives ``coreml0``, ``coreml1``...).

    Returns:
        ExecuTorch's ``PartitionResult`` (one tag per connected group of supported nodes), and the
        names of the nodes left to ExecuTorch at 0-d boundaries.
    """
    partitions, banned = propose_bindable_partitions(exported_program.graph_module, backend_support)
    tags = {}
    for partition in partitions:
        tag = f"{tag_prefix}{partition.id}"
        for node in partition.nodes:
            node.meta["delegation_tag"] = tag
        tags[tag] = delegation_spec
    tag_constant_data(exported_program)
    return PartitionResult(tagged_exported_program=exported_program, partition_tags=tags), banned


class BindablePartitioner(Partitioner):
    """A backend's own partitioner (``inner``), partitioning with :func:`tag_bindable_partitions`:
    its delegation spec and undecomposed ops, minus the nodes a runtime cannot bind.

    Subclasses give :meth:`support`, and name the backend (``title``, for the log) and the tags'
    prefix (``tag_prefix``). The log line goes to the subclass's module logger.

    Args:
        inner: the backend's ExecuTorch partitioner.
    """

    title = "the backend"
    tag_prefix = "delegate"

    def __init__(self, inner):
        self.inner = inner
        super().__init__()
        self.delegation_spec = inner.delegation_spec

    def ops_to_not_decompose(self, ep):
        """The wrapped partitioner's own list."""
        return self.inner.ops_to_not_decompose(ep)

    def support(self, exported_program) -> OperatorSupportBase:
        """The backend's operator support for ``exported_program``."""
        raise NotImplementedError

    def partition(self, exported_program) -> PartitionResult:
        """Tag the subgraphs the backend takes.

        Returns:
            ExecuTorch's ``PartitionResult``: one tag per connected group of supported nodes.
        """
        result, banned = tag_bindable_partitions(exported_program, self.support(exported_program),
                                                 self.delegation_spec, self.tag_prefix)
        if banned:
            logging.getLogger(type(self).__module__).debug(
                "%s partitioner: left to ExecuTorch at 0-d boundaries: %s", self.title, sorted(banned))
        return result
