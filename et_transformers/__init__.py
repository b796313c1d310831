"""et_transformers: run Hugging Face causal language models on ExecuTorch with the transformers API.

Public surface: :class:`ETModelForCausalLM`, :class:`ETModelForImageTextToText`, :class:`ExportConfig`, :func:`export_to_pte`,
:class:`Exporter`, :class:`GenerationStats`, :class:`GenerationResponse` (a streamed token),
:class:`ChatSession`, the errors and
:data:`SUPPORTED_MODEL_TYPES` (what exports, with :data:`MODEL_TYPE_ALIASES`).
Heavy modules load lazily, so ``import et_transformers`` is cheap and loading an exported model
never imports the export stack.
"""

from __future__ import annotations

from typing import Any

from .architectures import MODEL_TYPE_ALIASES, SUPPORTED_MODEL_TYPES, VISION_MODEL_TYPES
from .config import ExportConfig
from .errors import (
    CacheError,
    ConstraintError,
    ContextFullError,
    ETTransformersError,
    ExportError,
    HubError,
    InvalidConfigError,
    ModelNotFoundError,
    ProgramError,
    TokenizerError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

_LAZY = {
    "export_to_pte": "et_transformers.export",
    "Exporter": "et_transformers.export",
    "ETModelForCausalLM": "et_transformers.modeling",
    "ETModelForImageTextToText": "et_transformers.modeling_vlm",
    "GenerationStats": "et_transformers.generation",
    "GenerationResponse": "et_transformers.streaming",
    "ChatSession": "et_transformers.chat",
}

__all__ = [
    "CacheError",
    "ChatSession",
    "ConstraintError",
    "ContextFullError",
    "ETModelForCausalLM",
    "ETModelForImageTextToText",
    "ETTransformersError",
    "ExportConfig",
    "ExportError",
    "Exporter",
    "GenerationResponse",
    "GenerationStats",
    "HubError",
    "InvalidConfigError",
    "MODEL_TYPE_ALIASES",
    "ModelNotFoundError",
    "ProgramError",
    "SUPPORTED_MODEL_TYPES",
    "VISION_MODEL_TYPES",
    "TokenizerError",
    "UnsupportedModelError",
    "export_to_pte",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'et_transformers' has no attribute {name!r}")
