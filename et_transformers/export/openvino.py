"""OpenVINO specifics of the export: a partitioner that leaves out what the runtime cannot bind.

Imported only when a config names the ``openvino`` backend: it imports the OpenVINO package (the
``openvino`` extra). What was found by exporting the tiny test models and running them:

* ExecuTorch's ``OpenvinoPartitioner`` also claims nodes whose output is a 0-d tensor (the
  ``cache_position[0]`` that becomes ``start_pos``) or a ``SymInt``. The runtime cannot bind a rank-0
  tensor (the delegate's ``execute`` fails with Internal, 0x1) and OpenVINO's compiler cannot take
  a ``SymInt`` input (``'SymInt' object has no attribute 'type'``). :class:`OpenvinoLLMPartitioner`
  leaves such nodes to ExecuTorch.
* The delegate never resizes its outputs, so programs with it are built with static shapes, one
  token per call (``config.SINGLE_TOKEN_BACKENDS``).
* ``llama.custom_sdpa`` and ``llama.update_cache`` are not OpenVINO operators: attention and the
  KV cache run on ExecuTorch's kernels between OpenVINO subgraphs (two per layer), as they do
  beside XNNPACK.
* The partitioner prints a line per operator it does not take; they go to this module's debug log.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from executorch.backends.openvino.partitioner import OpenvinoOperatorsSupport, OpenvinoPartitioner
from executorch.exir.backend.backend_details import CompileSpec
from executorch.exir.backend.partitioner import Partitioner, PartitionResult
from executorch.exir.backend.utils import tag_constant_data
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

logger = logging.getLogger(__name__)

#: Device OpenVINO compiles the subgraphs for (a compile spec the runtime reads again).
OPENVINO_DEVICE = "CPU"


def bindable(node: torch.fx.Node) -> bool:
    """Whether every output of ``node`` is a tensor of rank >= 1, which OpenVINO's runtime can bind."""
    value = node.meta.get("val")
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in values)


class _BindableSupport(OperatorSupportBase):
    """OpenVINO's operator support, and :func:`bindable` outputs."""

    def __init__(self, openvino_support: OpenvinoOperatorsSupport):
        self.openvino_support = openvino_support

    def is_node_supported(self, submodules, node: torch.fx.Node) -> bool:
        return bindable(node) and self.openvino_support.is_node_supported(submodules, node)


class OpenvinoLLMPartitioner(Partitioner):
    """ExecuTorch's ``OpenvinoPartitioner`` (a final class, hence wrapped), minus the nodes whose
    outputs the runtime cannot bind; NNCF's int4 unpacking patterns are claimed as it claims them.

    Args:
        device: the OpenVINO device the subgraphs are compiled for.
    """

    def __init__(self, device: str = OPENVINO_DEVICE):
        self.inner = OpenvinoPartitioner([CompileSpec("device", device.encode())])
        super().__init__()
        self.delegation_spec = self.inner.delegation_spec

    def ops_to_not_decompose(self, ep):
        """OpenVINO's own list (``aten.stack`` for NNCF's int4 unpacking, image ops)."""
        return self.inner.ops_to_not_decompose(ep)

    def partition(self, exported_program) -> PartitionResult:
        """Tag the subgraphs OpenVINO takes.

        Returns:
            ExecuTorch's ``PartitionResult``: one tag per connected group of supported nodes.
        """
        gm = exported_program.graph_module
        self.inner.capture_nncf_patterns(gm)
        # The inner partitioner's set of NNCF pattern nodes it accepts whatever their op.
        support = _BindableSupport(OpenvinoOperatorsSupport(enabled_ops_by_name=self.inner._enabled_ops_by_name))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # "Op not supported: ..." per node it declines
            partitions = CapabilityBasedPartitioner(gm, support, allows_single_node_partition=True).propose_partitions()
        for line in sorted(set(printed.getvalue().splitlines())):
            logger.debug("OpenVINO partitioner: %s", line)
        tags = {}
        for partition in partitions:
            tag = f"openvino{partition.id}"
            for node in partition.nodes:
                node.meta["delegation_tag"] = tag
            tags[tag] = self.delegation_spec
        tag_constant_data(exported_program)
        return PartitionResult(tagged_exported_program=exported_program, partition_tags=tags)
