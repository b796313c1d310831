"""What one decode step reads of the weights: the byte count behind the achieved-bandwidth figure.

A decode step runs every layer once on one token, so it reads every weight tensor whole (linear
weights with their scales and zero points, norms, biases) except the embedding tables, of which it
reads one row. An embedding tied to the output head is read whole by the head and counted once.
The KV cache is not a weight and is not counted. Computed on the quantized module at export (the
pipeline's save stage records it in the manifest); gpt-fast prints the same figure.
"""

from __future__ import annotations

from torch import nn

from .quantize import QuantizedEmbedding, QuantizedLinear

_EMBEDDINGS = (nn.Embedding, QuantizedEmbedding)


def _stored_bytes(module: nn.Module, name: str, tensor) -> int:
    if isinstance(module, QuantizedLinear):
        if name == "zero_point":
            return 0  # symmetric: all zero, and XNNPACK's kernels read none
        if name == "qdata" and module.bits == 4:
            return tensor.numel() // 2  # int8 values in [-8, 7]; XNNPACK packs them two per byte
    return tensor.numel() * tensor.element_size()


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads from ``model`` (its parameters and buffers).

    Args:
        model: the module the program is built from (the transformers model inside
            :class:`~et_transformers.export.wrapper.ExportableCausalLM`, after quantization).

    Returns:
        The byte count: every tensor whole, each embedding table one row, shared tensors once.
    """

    def tensors(module):
        yield from ((n, t) for n, t in module._parameters.items() if t is not None)
        yield from ((n, t) for n, t in module._buffers.items() if t is not None)

    read_whole = {id(t) for m in model.modules() if not isinstance(m, _EMBEDDINGS) for _, t in tensors(m)}
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        rows = module.num_embeddings if isinstance(module, _EMBEDDINGS) else 1
        for name, tensor in tensors(module):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            size = _stored_bytes(module, name, tensor)
            total += size if id(tensor) in read_whole else size // rows
    return total
