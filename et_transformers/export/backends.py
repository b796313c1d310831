"""Backend name -> partitioner(s) (+ quantizer): the one table the lowering stage reads, in order.

``ExportConfig.backend`` names one backend or an ordered tuple of them; :data:`BACKEND_TABLE` says,
per name, which ExecuTorch partitioners lower to it, which operators it wants kept whole through
``to_edge`` (when it comes first), which graph quantizer it brings (OpenVINO's NNCF weight
compression), if any, and which ops its weight-only layers dequantize with. :func:`partitioners_for` concatenates the partitioners in the config's order,
so the first backend is offered every operator first and the next one only what is left.

OpenVINO's partitioner and quantizer, and what they do to a language model, are in :mod:`.openvino`;
Core ML's partitioner and compile specs in :mod:`.coreml`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import BACKENDS, ExportConfig

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Backend:
    """One row of :data:`BACKEND_TABLE`.

    Attributes:
        name: the ``ExportConfig.backend`` name.
        delegate_id: the id its delegates carry in a ``.pte`` (``None``: it delegates nothing).
        partitioners: ``config -> [partitioner, ...]``, in the order they are applied.
        keep_ops: ``() -> ops`` kept whole through ``to_edge`` when this backend comes first (the
            ones its partitioner matches undecomposed).
        quantizer: the backend's own quantization, of the exported graph, when it comes first:
            ``config -> (graph module -> (compressed graph module, report))``, or ``None`` when the
            config asks none. ``None`` here: the backend has none, and ``quantize_model``'s source
            transforms (ExecuTorch's quantized-op vocabulary) serve it.
        weight_ops: the ops weight-only linear layers dequantize with when the backend comes first:
            ``"quantized_decomposed"`` (ExecuTorch's vocabulary) or ``"torchao"``
            (``torchao.dequantize_affine``, which Core ML's converter turns into 4/8-bit constants).
            Vulkan keeps the first: its partitioner fuses those 4-bit groupwise layers into
            ``et_vk.linear_q4gsw``.
    """

    name: str
    delegate_id: str | None
    partitioners: Callable[[ExportConfig], list]
    keep_ops: Callable[[], tuple] = tuple
    quantizer: Callable[[ExportConfig], Any] | None = None
    weight_ops: str = "quantized_decomposed"


# -- XNNPACK ------------------------------------------------------------------------------


def _xnnpack_partitioners(cfg: ExportConfig) -> list:
    from executorch.extension.llm.export.partitioner_lib import get_xnnpack_partitioner

    # One partitioner for quantized and float ops alike: the dynamic-quant-only partitioner
    # would cut every linear into its own delegate (hundreds of small subgraphs, slow to lower).
    # Programs with our kernels are the exception: XNNPACK takes only their few 8-bit linears
    # (the head), and everything between our kernels stays out of delegates (see .layer_ops).
    return [get_xnnpack_partitioner(dynamic_quant_only_partitioner=cfg.uses_own_kernels,
                                    enable_bf16=cfg.dtype == "bfloat16")]


def _keep_linear() -> tuple:
    # XNNPACK: our quantized layers are already in ExecuTorch's quantized-op vocabulary, and it needs
    # only linear whole (see .lowering). Core ML converts linear whole (its own op, and the one its
    # int4/int8 weights feed).
    return (torch.ops.aten.linear.default,)


# -- OpenVINO (the partitioner and quantizer live in .openvino, which imports the OpenVINO package) --


def _openvino_partitioners(cfg: ExportConfig) -> list:
    from .openvino import OPENVINO_DEVICE, OpenvinoLLMPartitioner

    return [OpenvinoLLMPartitioner(OPENVINO_DEVICE)]


def _openvino_quantizer(cfg: ExportConfig):
    if cfg.qlinear is None:
        return None
    from .openvino import compress_weights

    return lambda gm: compress_weights(gm, cfg)


def _openvino_keep_ops() -> tuple:
    # NNCF's int4 weights unpack through aten.stack, which the partitioner matches whole.
    return (torch.ops.aten.stack.default,)


# -- Vulkan ---------------------------------------------------------------------------------


def _vulkan_partitioners(cfg: ExportConfig) -> list:
    root = logging.getLogger()
    level = root.level
    try:  # importing it sets the root logger to INFO (vulkan_partitioner.py): undo that
        from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
    finally:
        root.setLevel(level)
    # ExecuTorch's LLM helper's options: dynamic shapes only when the program has them
    return [VulkanPartitioner({"require_dynamic_shapes": cfg.tokens_per_call > 1, "force_fp16": False})]


# -- Core ML (the partitioner and compile specs live in .coreml, which imports coremltools) -----------


def _coreml_partitioners(cfg: ExportConfig) -> list:
    from .coreml import CoreMLLLMPartitioner

    return [CoreMLLLMPartitioner(cfg)]


#: The table: backend name -> how to lower to it. Keys are exactly ``config.BACKENDS``.
BACKEND_TABLE: dict[str, Backend] = {
    "xnnpack": Backend("xnnpack", "XnnpackBackend", _xnnpack_partitioners, _keep_linear),
    "portable": Backend("portable", None, lambda cfg: []),
    "openvino": Backend("openvino", "OpenvinoBackend", _openvino_partitioners, _openvino_keep_ops, _openvino_quantizer),
    # weight_ops stays quantized_decomposed: Vulkan's partitioner fuses its dequantize_per_channel_group
    # + mm into et_vk.linear_q4gsw, and asserts on torchao.dequantize_affine without a zero-point tensor
    # (patterns/quantized_linear.py, QuantizedLinearMatch), which is how Core ML's weights come
    "vulkan": Backend("vulkan", "VulkanBackend", _vulkan_partitioners),
    "coreml": Backend("coreml", "CoreMLBackend", _coreml_partitioners, _keep_linear, weight_ops="torchao"),
}
assert tuple(BACKEND_TABLE) == BACKENDS, "export.backends.BACKEND_TABLE and config.BACKENDS name the same backends"


def partitioners_for(cfg: ExportConfig) -> list:
    """The partitioners of ``cfg.backends``, in order: the first backend's get first pick.

    Raises:
        ExportError: a backend's export package is missing (the message says what to install).
    """
    from ..delegates import DELEGATES
    from ..errors import ExportError

    parts = []
    for name in cfg.backends:
        backend = BACKEND_TABLE[name]
        try:
            parts += backend.partitioners(cfg)
        except ImportError as e:
            raise ExportError(
                f"backend {name!r} cannot be exported to here ({e}): {DELEGATES[backend.delegate_id].install}."
            ) from e
    return parts


def keep_ops_for(cfg: ExportConfig) -> list:
    """Operators ``to_edge`` keeps whole: the first backend's (the later ones take what is left)."""
    return list(BACKEND_TABLE[cfg.backends[0]].keep_ops())


def weight_ops_for(cfg: ExportConfig) -> str:
    """The ops ``cfg``'s weight-only linear layers dequantize with: the first backend's
    :attr:`Backend.weight_ops`."""
    return BACKEND_TABLE[cfg.backends[0]].weight_ops


def quantizes_graph(cfg: ExportConfig) -> bool:
    """Whether ``cfg``'s first backend brings its own (graph) quantizer, which then replaces the
    source-level quantization of :func:`.quantize.quantize_model`."""
    return BACKEND_TABLE[cfg.backends[0]].quantizer is not None


def graph_quantizer_for(cfg: ExportConfig):
    """The first backend's graph quantizer for ``cfg`` (see :class:`Backend`), or ``None``."""
    make = BACKEND_TABLE[cfg.backends[0]].quantizer
    return make(cfg) if make else None
