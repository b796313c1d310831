"""The export pipeline: a Hugging Face causal LM → a self-describing ExecuTorch ``.pte``.

Stages, one module each: :mod:`.loading` (files → transformers model), :mod:`.attention` and
:mod:`.wrapper` (custom SDPA over an in-place static KV cache, last-position logits),
:mod:`.rope` and :mod:`.passes` (XNNPACK-friendly forms), :mod:`.quantize` (torchao values in
ExecuTorch's quantized-op vocabulary) and :mod:`.pipeline` (the staged :class:`Exporter` and
:func:`export_to_pte`). Importing this package imports torch and transformers; the runtime side of
et_transformers never does.
"""

from .pipeline import STAGES, Exporter, export_to_pte

__all__ = ["Exporter", "STAGES", "export_to_pte"]
