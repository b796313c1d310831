"""Core ML specifics of the export: compile specs, and a partitioner that keeps ``SymInt``\\ s out.

Imported only when a config names the ``coreml`` backend: it imports coremltools (which comes with
the executorch wheel). Programs are exported here and run on an Apple device's ExecuTorch runtime
with the Core ML backend; no executorch pip wheel for Linux registers ``CoreMLBackend``. What was
found by lowering the tiny test models:

* ExecuTorch's ``CoreMLPartitioner`` claims the nodes that read ``cache_position[0].item()`` (an
  unbacked ``SymInt``), and coremltools then fails on the delegate's inputs (``Placeholder val must
  be a tensor or fake tensor, but got type <class 'torch.SymInt'>``), with static shapes as with
  dynamic ones. :class:`CoreMLLLMPartitioner` never delegates a ``SymInt``-valued node and leaves
  0-d values at delegate boundaries to ExecuTorch (:mod:`.boundaries`).
* ``llama.custom_sdpa`` and ``llama.update_cache`` are not Core ML operators: attention and the KV
  cache run on ExecuTorch's kernels between Core ML subgraphs, as beside XNNPACK or OpenVINO.
* Programs are static, one token per call (``config.SINGLE_TOKEN_BACKENDS``), as ExecuTorch's own
  LLM export does for Core ML ("Dynamic shape is not supported with coreml").
* Compile specs are those of ExecuTorch's LLM helper (``partitioner_lib.get_coreml_partitioner``):
  minimum deployment target iOS 18 / macOS 15 (blockwise int4 weights need it), CPU compute units
  (:data:`COMPUTE_UNIT`), and the precision of ``ExportConfig.dtype`` (:data:`PRECISIONS`).
  Mutable buffers stay with ExecuTorch (the LLM helper's ``take_over_mutable_buffer=False``);
  weights go into the delegates.
* Weight-only int4/int8 layers reach Core ML as ``torchao.dequantize_affine`` of constant weights
  (see :mod:`.quantize`), which ExecuTorch's Core ML converter turns into Core ML's constexpr
  blockwise dequantization: the weights are stored in 4 or 8 bits in the delegate.
"""

from __future__ import annotations

import logging

import coremltools as ct
from executorch.backends.apple.coreml.compiler import CoreMLBackend
from executorch.backends.apple.coreml.partition import CoreMLPartitioner
from executorch.backends.apple.coreml.partition.coreml_partitioner import _OperatorsSupportedForCoreMLBackend
from executorch.exir.backend.partitioner import Partitioner, PartitionResult

from ..config import ExportConfig
from .boundaries import tag_bindable_partitions

logger = logging.getLogger(__name__)

#: Oldest OS the Core ML programs load on (iOS 18 / macOS 15: blockwise int4 weights and fp16 I/O).
DEPLOYMENT_TARGET = ct.target.iOS18

#: Core ML compute units: the CPU, as ExecuTorch's LLM helper defaults to ("On iPhone 15 Pro, CPU
#: decode model is over 8x faster than GPU for stories110M").
COMPUTE_UNIT = ct.ComputeUnit.CPU_ONLY

#: ``ExportConfig.dtype`` -> the precision Core ML computes in.
PRECISIONS = {"float16": ct.precision.FLOAT16, "float32": ct.precision.FLOAT32}


def compile_specs(cfg: ExportConfig) -> list:
    """The Core ML compile specs for ``cfg``: :data:`DEPLOYMENT_TARGET`, :data:`COMPUTE_UNIT`, and
    the precision of ``cfg.dtype`` (:data:`PRECISIONS`); a model (``.mlpackage``) per delegate."""
    return CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=DEPLOYMENT_TARGET,
        compute_unit=COMPUTE_UNIT,
        compute_precision=PRECISIONS[cfg.dtype],
        model_type=CoreMLBackend.MODEL_TYPE.MODEL,
    )


class CoreMLLLMPartitioner(Partitioner):
    """ExecuTorch's ``CoreMLPartitioner`` minus ``SymInt``-valued nodes and nodes at 0-d delegate
    boundaries (:func:`.boundaries.propose_bindable_partitions`); weights go into the delegates,
    mutable buffers (the KV cache) stay with ExecuTorch.

    Args:
        cfg: the export config (its dtype picks Core ML's compute precision).
    """

    def __init__(self, cfg: ExportConfig):
        self.inner = CoreMLPartitioner(compile_specs=compile_specs(cfg), take_over_mutable_buffer=False)
        super().__init__()
        self.delegation_spec = self.inner.delegation_spec

    def ops_to_not_decompose(self, ep):
        """Core ML's own list (every operator it converts whole)."""
        return self.inner.ops_to_not_decompose(ep)

    def partition(self, exported_program) -> PartitionResult:
        """Tag the subgraphs Core ML takes.

        Returns:
            ExecuTorch's ``PartitionResult``: one tag per connected group of supported nodes.
        """
        support = _OperatorsSupportedForCoreMLBackend(log=False)
        result, banned = tag_bindable_partitions(exported_program, support, self.delegation_spec, "coreml")
        if banned:
            logger.debug("Core ML partitioner: left to ExecuTorch at 0-d boundaries: %s", sorted(banned))
        return result
