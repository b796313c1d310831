"""Lowering: exported ATen program → Edge dialect → delegates, fast enough for real models.

ExecuTorch's ``to_edge_transform_and_lower`` re-traces the whole program three times to decide
which ops partitioners keep, and XNNPACK then runs seventeen graph passes over every delegate,
most of them for ops a language model never contains (bilinear upsampling, batch norm, PReLU,
conv1d, max-pool, padding, SDPA patterns). Each trace and pass costs milliseconds per node with
dynamic shapes, which added up to five minutes for a 135M-parameter model on two cores.

We lower in two steps instead: one ``to_edge`` that keeps the first backend's operators whole
(for XNNPACK only ``aten.linear``: our quantized layers are already expressed in ExecuTorch's
quantized-op vocabulary; see :mod:`.backends`), then ``to_backend`` with each partitioner in order. While the XNNPACK
backend preprocesses a delegate, :func:`lean_xnnpack_passes` skips the passes whose target ops the
delegate does not contain; a skipped pass would have found nothing to rewrite, so the delegate is
the same (the parity tests compare against eager transformers token for token).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

#: XNNPACK pass -> substrings of op names it rewrites; the pass is skipped when none is present.
_PASS_TRIGGERS: dict[str, tuple[str, ...]] = {
    "ConvertToUpsampleBilinear2d": ("upsample", "_unsafe_index", "index.Tensor"),
    "ConvertToSDPAPass": ("softmax",),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "Conv1dUnsqueezePass": ("convolution",),
    "PReLUReshapePass": ("prelu",),
    "InsertPadQDQPass": ("constant_pad_nd",),
    "RemoveGetItemPass": ("max_pool",),
    "DecomposeConcatenate": ("cat.",),
    "DimOrderOpsRevertPass": ("dim_order",),
}


def _op_names(ep) -> str:
    return " ".join(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


@contextlib.contextmanager
def lean_xnnpack_passes() -> Iterator[None]:
    """Within the block, XNNPACK preprocessing skips passes that have nothing to rewrite."""
    import executorch.backends.xnnpack.xnnpack_preprocess as xnnpack_preprocess

    original = xnnpack_preprocess.XNNPACKPassManager

    class LeanPassManager(original):
        def __init__(self, exported_program, passes=None):
            super().__init__(exported_program, passes)
            if passes is None:  # only the default list is filtered
                ops = _op_names(exported_program)
                self.passes = [
                    p for p in self.passes
                    if p.__name__ not in _PASS_TRIGGERS or any(t in ops for t in _PASS_TRIGGERS[p.__name__])
                ]

    xnnpack_preprocess.XNNPACKPassManager = LeanPassManager
    try:
        yield
    finally:
        xnnpack_preprocess.XNNPACKPassManager = original


def lower(
    exported_program,
    partitioners: Sequence[Any],
    constant_methods: dict[str, Any],
    *,
    keep_ops: Sequence[Any] = (),
    generate_etrecord: bool = False,
):
    """Convert ``exported_program`` to the Edge dialect and delegate with ``partitioners`` in order.

    Each partitioner is offered what the ones before it left: ``to_backend`` per partitioner, as
    ``to_edge_transform_and_lower`` does with its list.

    Args:
        exported_program: the ``torch.export`` output.
        partitioners: ordered partitioners (see :func:`.backends.partitioners_for`).
        constant_methods: the metadata methods the program carries.
        keep_ops: operators ``to_edge`` leaves undecomposed (the first backend's, see
            :func:`.backends.keep_ops_for`).
        generate_etrecord: record an ETRecord.

    Returns:
        The ``EdgeProgramManager``.
    """
    from executorch.exir import EdgeCompileConfig, to_edge

    keep = list(keep_ops)
    edge = to_edge(
        exported_program,
        constant_methods=constant_methods,
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True, preserve_ops=keep),
        generate_etrecord=generate_etrecord,
    )
    xnnpack_logger = logging.getLogger("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    previous = xnnpack_logger.level
    # It warns that to_edge + to_backend is deprecated; this module explains why we use it.
    xnnpack_logger.setLevel(logging.ERROR)
    try:
        with lean_xnnpack_passes():
            for partitioner in partitioners:
                edge = edge.to_backend(partitioner)
    finally:
        xnnpack_logger.setLevel(previous)
    return edge
