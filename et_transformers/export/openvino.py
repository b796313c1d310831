"""OpenVINO specifics of the export: a partitioner that leaves out what the runtime cannot bind.

Imported only when a config names the ``openvino`` backend: it imports the OpenVINO package (the
``openvino`` extra). What was found by exporting the tiny test models and running them:

* ExecuTorch's ``OpenvinoPartitioner`` also claims nodes whose output is a 0-d tensor (the
  ``cache_position[0]`` that becomes ``start_pos``) or a ``SymInt``. The runtime cannot bind a rank-0
  tensor as a delegate input or output (``execute`` fails with Internal, 0x1) and OpenVINO's
  compiler cannot take a ``SymInt`` input (``'SymInt' object has no attribute 'type'``).
  :class:`OpenvinoLLMPartitioner` never delegates a ``SymInt``-valued node, and leaves to
  ExecuTorch every node that would pass a 0-d tensor across a delegate boundary
  (:mod:`.boundaries`); a 0-d value read only inside its delegate (NNCF's scalar zero points) stays.
* The delegate never resizes its outputs, so programs with it are built with static shapes, one
  token per call (``config.SINGLE_TOKEN_BACKENDS``).
* ``llama.custom_sdpa`` and ``llama.update_cache`` are not OpenVINO operators: attention and the
  KV cache run on ExecuTorch's kernels between OpenVINO subgraphs (two per layer), as they do
  beside XNNPACK.
* The partitioner prints a line per operator it does not take; they go to this module's debug log.

Weight compression (:func:`compress_weights`): NNCF's data-free ``compress_pt2e`` with ExecuTorch's
``OpenVINOQuantizer`` rewrites the exported graph's weights into int4/int8 constants plus a small
decompression subgraph per weight, which the partitioner hands to OpenVINO whole (its own int4
matmul); the graph is then exported again. The program computes exactly what the compressed
graph computes in PyTorch (``tests/test_backends.py`` compares their greedy tokens).
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from executorch.backends.openvino.partitioner import OpenvinoOperatorsSupport, OpenvinoPartitioner
from executorch.exir.backend.backend_details import CompileSpec
from executorch.exir.backend.partitioner import PartitionResult

from ..config import ExportConfig
from .boundaries import BindablePartitioner

logger = logging.getLogger(__name__)

#: Device OpenVINO compiles the subgraphs for (a compile spec the runtime reads again).
OPENVINO_DEVICE = "CPU"

#: Smallest int4 group a layer's group is reduced to when ``qlinear_group_size`` does not divide its inputs.
MIN_ADJUSTED_GROUP = 32


class OpenvinoLLMPartitioner(BindablePartitioner):
    """ExecuTorch's ``OpenvinoPartitioner`` (a final class, hence wrapped), minus the nodes whose
    values the runtime cannot bind at a delegate boundary (:class:`.boundaries.BindablePartitioner`);
    NNCF's int4 unpacking patterns are claimed as it claims them.

    Args:
        device: the OpenVINO device the subgraphs are compiled for.
    """

    title = "OpenVINO"
    tag_prefix = "openvino"

    def __init__(self, device: str = OPENVINO_DEVICE):
        from ..delegates import pin_openvino_float32

        pin_openvino_float32()  # before OpenVINO first compiles in this process (bfloat16 CPUs)
        super().__init__(OpenvinoPartitioner([CompileSpec("device", device.encode())]))

    def support(self, exported_program):
        """OpenVINO's operator support, with the NNCF pattern nodes it accepts whatever their op."""
        return OpenvinoOperatorsSupport(enabled_ops_by_name=self.inner._enabled_ops_by_name)

    def partition(self, exported_program) -> PartitionResult:
        """Tag the subgraphs OpenVINO takes (its "Op not supported" lines go to the debug log).

        Returns:
            ExecuTorch's ``PartitionResult``: one tag per connected group of supported nodes.
        """
        self.inner.capture_nncf_patterns(exported_program.graph_module)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # "Op not supported: ..." per node it declines
            result = super().partition(exported_program)
        for line in sorted(set(printed.getvalue().splitlines())):
            logger.debug("OpenVINO partitioner: %s", line)
        return result

def compress_weights(gm: torch.fx.GraphModule, cfg: ExportConfig) -> tuple[torch.fx.GraphModule, dict]:
    """Compress the weights of the exported module ``gm`` as ``cfg`` asks (see
    ``config.OPENVINO_COMPRESSIONS``): int4 symmetric in ``qlinear_group_size`` groups (a layer whose
    input size that does not divide in the largest power-of-two group that does, at least
    :data:`MIN_ADJUSTED_GROUP`, else int8), or int8 asymmetric per channel; the embedding and head
    in 8 bits unless they follow ``qlinear``.

    Args:
        gm: ``ExportedProgram.module()`` of the program to compress.
        cfg: the export config (OpenVINO first, ``qlinear`` set).

    Returns:
        The compressed module, and a report for the manifest.
    """
    from executorch.backends.openvino.quantizer import OpenVINOQuantizer, QuantizationMode
    import nncf
    from nncf.experimental.torch.fx import compress_pt2e

    all_layers = cfg.head_scheme == cfg.qlinear  # NNCF's first/last layers (embedding, head) too
    if cfg.qlinear == "4w":
        # group_size -1 is NNCF's "per output channel"
        params = {"mode": QuantizationMode.INT4WO_SYM, "group_size": cfg.qlinear_group_size or -1, "ratio": 1}
    else:
        params = {"mode": QuantizationMode.INT8WO_ASYM, "group_size": -1, "ratio": None}
    # A layer whose input size the group does not divide gets the largest power-of-two group that
    # does (at least 32), else int8 per channel: NNCF's ADJUST (SmolLM2's 576 inputs take 64 for 128).
    advanced = nncf.AdvancedCompressionParameters(
        group_size_fallback_mode=nncf.quantization.advanced_parameters.GroupSizeFallbackMode.ADJUST,
        min_adjusted_group_size=MIN_ADJUSTED_GROUP,
    )
    quantizer = OpenVINOQuantizer(**params, all_layers=all_layers, advanced_parameters=advanced)
    compressed = compress_pt2e(gm, quantizer=quantizer)
    decompressors = sum(1 for name, _ in compressed.named_children() if "weights_decompressor" in name)
    report = {
        "quantizer": "nncf.compress_pt2e (OpenVINOQuantizer)",
        "mode": params["mode"].value,
        "group_size": params["group_size"],
        "embedding_and_head": cfg.qlinear if all_layers else "8w",
        "compressed_weights": decompressors,
    }
    logger.info("OpenVINO weight compression: %s", report)
    return compressed, report
