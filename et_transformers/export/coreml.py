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

import coremltools as ct
from executorch.backends.apple.coreml.compiler import CoreMLBackend
from executorch.backends.apple.coreml.partition import CoreMLPartitioner
from executorch.backends.apple.coreml.partition.coreml_partitioner import _OperatorsSupportedForCoreMLBackend

from ..config import ExportConfig
from .boundaries import BindablePartitioner


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


class CoreMLLLMPartitioner(BindablePartitioner):
    """ExecuTorch's ``CoreMLPartitioner`` minus ``SymInt``-valued nodes and nodes at 0-d delegate
    boundaries (:class:`.boundaries.BindablePartitioner`); weights go into the delegates,
    mutable buffers (the KV cache) stay with ExecuTorch.

    Args:
        cfg: the export config (its dtype picks Core ML's compute precision).
    """

    title = "Core ML"
    tag_prefix = "coreml"

    def __init__(self, cfg: ExportConfig):
        super().__init__(CoreMLPartitioner(compile_specs=compile_specs(cfg), take_over_mutable_buffer=False))

    def support(self, exported_program):
        """Core ML's operator support (every operator it converts)."""
        return _OperatorsSupportedForCoreMLBackend(log=False)
