"""Exception hierarchy of et_transformers.

Every error the package raises on purpose derives from :class:`ETTransformersError`, and where a
built-in exception type fits (``ValueError`` for bad values, ``FileNotFoundError`` for missing
paths) the error derives from it too, so callers can catch either. Messages name the offending
value, the accepted values or limit, and the fix.
"""

from __future__ import annotations


class ETTransformersError(Exception):
    """Base class of every error raised by et_transformers."""


class InvalidConfigError(ETTransformersError, ValueError):
    """An :class:`~et_transformers.ExportConfig` field or recipe name is not valid."""


class UnsupportedModelError(ETTransformersError, ValueError):
    """The model's architecture (``model_type``) is not one et_transformers can export."""


class ModelNotFoundError(ETTransformersError, FileNotFoundError):
    """A model path, file or repository does not exist or holds no usable model."""


class ExportError(ETTransformersError, RuntimeError):
    """A stage of the export pipeline failed."""


class CacheError(ETTransformersError, RuntimeError):
    """The artifact cache could not store or return an entry."""


class ProgramError(ETTransformersError, RuntimeError):
    """An ExecuTorch program could not be loaded or run, or is not an LLM program we understand."""


class HubError(ETTransformersError, RuntimeError):
    """A Hugging Face Hub operation (download, upload) failed."""


class ContextFullError(ETTransformersError, ValueError):
    """A conversation or prompt no longer fits the program's context (its KV cache length)."""


class TokenizerError(ETTransformersError, ValueError):
    """A text feature (a text prompt, ``stop_strings``, a chat) needs a tokenizer the model lacks, or
    a ``tokenizer=`` path holds none."""


class ConstraintError(ETTransformersError, ValueError):
    """A ``response_format`` (JSON schema, regex, choice, grammar) or a tool definition is not valid,
    cannot be compiled, or asks for text the vocabulary cannot spell; or constrained decoding reached
    a state no token can continue."""
