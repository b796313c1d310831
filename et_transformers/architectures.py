"""The table of supported architectures, and the check that refuses everything else.

:data:`SUPPORTED_MODEL_TYPES` maps a Hugging Face ``model_type`` to an :class:`Architecture`; a
type is listed only once a golden test proves its export token-identical to eager transformers.
:data:`MODEL_TYPE_ALIASES` maps other spellings to a listed type. Export consults this table before
any heavy work; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    """One supported decoder-only family.

    Attributes:
        model_type: the Hugging Face ``config.model_type``.
        family: the name users know (``"Llama"``, ``"Qwen2"``...).
        examples: well-known checkpoints of this type.
        features: the family's distinctive parts our export reproduces exactly.
    """

    model_type: str
    family: str
    examples: tuple[str, ...] = ()
    features: tuple[str, ...] = ()


SUPPORTED_MODEL_TYPES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            "llama",
            "Llama",
            examples=("HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.2-1B"),
            features=("RoPE", "GQA", "llama3 rope scaling"),
        ),
    )
}

#: Other spellings of a supported ``model_type``.
MODEL_TYPE_ALIASES: dict[str, str] = {}


def resolve_architecture(config: Any) -> Architecture:
    """Return the :class:`Architecture` for a transformers config (or a ``model_type`` string).

    Raises:
        UnsupportedModelError: the type is not in :data:`SUPPORTED_MODEL_TYPES`; the message lists
            the supported types.
    """
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported by et_transformers. Supported model types: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            + (f" (aliases: {', '.join(sorted(MODEL_TYPE_ALIASES))})" if MODEL_TYPE_ALIASES else "")
            + "."
        )
    return SUPPORTED_MODEL_TYPES[model_type]
