"""The table of supported architectures, and the checks that refuse everything else.

:data:`SUPPORTED_MODEL_TYPES` maps a Hugging Face ``model_type`` to an :class:`Architecture`: the
transformers class that builds it, the family's distinctive parts, and the few facts the export
and the generation loop need (a learned position table that caps the context; Phi-3's cache
rebuild when longrope switches factors). A type is listed only once its golden test
(``tests/test_families.py``) proves the export token-identical to eager transformers.
:data:`MODEL_TYPE_ALIASES` maps other spellings that transformers builds with the same config and
model classes. :data:`VISION_MODEL_TYPES` does the same for image-text-to-text models: each
entry names the transformers class, where its text decoder and image token live, and the text
decoder's own ``model_type`` must be in :data:`SUPPORTED_MODEL_TYPES`. Export consults this module
before any weight is read; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidConfigError, UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    """One supported decoder-only family.

    Attributes:
        model_type: the Hugging Face ``config.model_type``.
        family: the name users know (``"Llama"``, ``"Qwen2"``...).
        model_class: the transformers class that builds it (``"LlamaForCausalLM"``).
        examples: well-known checkpoints of this type.
        features: the family's distinctive parts our export reproduces exactly.
        learned_positions: positions come from a learned table (GPT-2), so the context cannot
            exceed ``config.max_position_embeddings``.
        rebuilds_cache_past_original_context: transformers' ``generate()`` drops the KV cache and
            re-runs the whole sequence the first time it grows past
            ``config.original_max_position_embeddings`` (Phi-3, whose longrope then switches to
            its long factors for every position); our generation loop does the same.
    """

    model_type: str
    family: str
    model_class: str
    examples: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    learned_positions: bool = False
    rebuilds_cache_past_original_context: bool = False


SUPPORTED_MODEL_TYPES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            "llama", "Llama", "LlamaForCausalLM",
            examples=("meta-llama/Llama-3.2-1B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
            features=("GQA", "llama3 and dynamic (NTK) RoPE scaling"),
        ),
        Architecture(
            "smollm3", "SmolLM3", "SmolLM3ForCausalLM",
            examples=("HuggingFaceTB/SmolLM3-3B",),
            features=("NoPE layers (no rotary embedding on every 4th layer)",),
        ),
        Architecture(
            "mistral", "Mistral", "MistralForCausalLM",
            examples=("mistralai/Mistral-7B-Instruct-v0.1",),
            features=("sliding-window attention",),
        ),
        Architecture(
            "qwen2", "Qwen2 / Qwen2.5", "Qwen2ForCausalLM",
            examples=("Qwen/Qwen2.5-0.5B-Instruct",),
            features=("q/k/v biases", "YaRN RoPE scaling", "optional sliding window"),
        ),
        Architecture(
            "qwen3", "Qwen3", "Qwen3ForCausalLM",
            examples=("Qwen/Qwen3-0.6B",),
            features=("QK-norm", "optional sliding window"),
        ),
        Architecture(
            "phi3", "Phi-3 / Phi-4-mini", "Phi3ForCausalLM",
            examples=("microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-4-mini-instruct"),
            features=("fused qkv and gate/up projections", "longrope (short/long factors)",
                      "partial rotary", "sliding window"),
            rebuilds_cache_past_original_context=True,
        ),
        Architecture(
            "gemma", "Gemma", "GemmaForCausalLM",
            examples=("google/gemma-2b-it",),
            features=("scaled embeddings", "(1 + w) RMSNorm", "GeGLU"),
        ),
        Architecture(
            "gemma2", "Gemma2", "Gemma2ForCausalLM",
            examples=("google/gemma-2-2b-it",),
            features=("attention and final logit softcapping", "alternating sliding window"),
        ),
        Architecture(
            "gemma3_text", "Gemma3 (text)", "Gemma3ForCausalLM",
            examples=("google/gemma-3-1b-it", "google/gemma-3-270m"),
            features=("hybrid local/global attention", "per-layer-type RoPE, linear scaling on global layers",
                      "QK-norm"),
        ),
        Architecture(
            "gpt2", "GPT-2", "GPT2LMHeadModel",
            examples=("openai-community/gpt2", "distilbert/distilgpt2", "nanoGPT checkpoints"),
            features=("learned absolute positions", "Conv1D projections"),
            learned_positions=True,
        ),
        Architecture(
            "gpt_neox", "GPT-NeoX / Pythia", "GPTNeoXForCausalLM",
            examples=("EleutherAI/pythia-160m",),
            features=("partial rotary", "parallel residual", "fused qkv"),
        ),
        Architecture(
            "olmo", "OLMo", "OlmoForCausalLM",
            examples=("allenai/OLMo-1B-hf",),
            features=("non-parametric LayerNorm", "q/k/v clipping"),
        ),
        Architecture(
            "olmo2", "OLMo 2", "Olmo2ForCausalLM",
            examples=("allenai/OLMo-2-0425-1B-Instruct",),
            features=("post-norm blocks", "QK-norm over all heads"),
        ),
        Architecture(
            "granite", "Granite", "GraniteForCausalLM",
            examples=("ibm-granite/granite-3.3-2b-instruct",),
            features=("embedding / residual / attention / logit multipliers",),
        ),
    )
}

#: Other ``model_type`` spellings that transformers builds with the same config and model classes.
MODEL_TYPE_ALIASES: dict[str, str] = {
    "gpt-sw3": "gpt2",  # AI Sweden's GPT-SW3: GPT2Config + GPT2LMHeadModel
}


def supported_list() -> str:
    """``"gemma, gemma2, ... (aliases: gpt-sw3)"``: what error messages list."""
    text = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
    if MODEL_TYPE_ALIASES:
        text += " (aliases: " + ", ".join(f"{a} -> {t}" for a, t in sorted(MODEL_TYPE_ALIASES.items())) + ")"
    return text


def resolve_architecture(config: Any) -> Architecture:
    """Return the :class:`Architecture` for a transformers config (or a ``model_type`` string).

    Raises:
        UnsupportedModelError: the type is not in :data:`SUPPORTED_MODEL_TYPES` (nor an alias);
            the message lists the supported types.
    """
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
    if model_type in VISION_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is an image-text-to-text model; load it with "
            f"ETModelForImageTextToText (the text-only ETModelForCausalLM has no vision encoder)."
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported by et_transformers. Supported model types: "
            f"{supported_list()}."
        )
    return SUPPORTED_MODEL_TYPES[model_type]


@dataclass(frozen=True)
class VisionArchitecture:
    """One supported image-text-to-text family: a vision encoder whose features replace the image
    tokens' embeddings in a supported text decoder.

    Attributes:
        model_type: the Hugging Face ``config.model_type``.
        family: the name users know.
        model_class: the transformers class that builds it (``"LlavaForConditionalGeneration"``).
        language_model: attribute of the base model (``model.model``) holding the text decoder.
        examples: well-known checkpoints.
        notes: what the export does differently from the family's eager code, if anything.
    """

    model_type: str
    family: str
    model_class: str
    language_model: str = "language_model"
    examples: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


VISION_MODEL_TYPES: dict[str, VisionArchitecture] = {
    a.model_type: a
    for a in (
        VisionArchitecture(
            "llava", "LLaVA", "LlavaForConditionalGeneration",
            examples=("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-interleave-qwen-0.5b-hf"),
        ),
        VisionArchitecture(
            "idefics3", "Idefics3", "Idefics3ForConditionalGeneration", language_model="text_model",
            examples=("HuggingFaceM4/Idefics3-8B-Llama3",),
        ),
        VisionArchitecture(
            "smolvlm", "SmolVLM", "SmolVLMForConditionalGeneration", language_model="text_model",
            examples=("HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"),
        ),
        VisionArchitecture(
            "gemma3", "Gemma 3 (vision)", "Gemma3ForConditionalGeneration",
            examples=("google/gemma-3-4b-it",),
            notes=("image tokens attend causally, as without token_type_ids (transformers lets each "
                   "image's tokens see each other when token_type_ids is passed)",),
        ),
    )
}


def resolve_vision_architecture(config: Any) -> VisionArchitecture:
    """Return the :class:`VisionArchitecture` for a transformers config (or a ``model_type``).

    Raises:
        UnsupportedModelError: not a supported image-text-to-text type; a text-only type gets a
            message that points to ``ETModelForCausalLM``.
    """
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type in VISION_MODEL_TYPES:
        return VISION_MODEL_TYPES[model_type]
    if MODEL_TYPE_ALIASES.get(model_type, model_type) in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is a text-only model: it takes no images. Load it with "
            f"ETModelForCausalLM."
        )
    raise UnsupportedModelError(
        f"model_type={model_type!r} is not a supported image-text-to-text model. Supported: "
        f"{', '.join(sorted(VISION_MODEL_TYPES))}."
    )


def check_config(config: Any, max_seq_len: int | None = None) -> Architecture:
    """Check that ``config`` is a supported type, in a variant we export exactly, for ``max_seq_len``
    (when given).

    Raises:
        UnsupportedModelError: unsupported type, or a variant of a supported one that is not a
            causal LM (bidirectional attention).
        InvalidConfigError: ``max_seq_len`` exceeds a learned position table.
    """
    arch = resolve_architecture(config)
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        raise UnsupportedModelError(
            f"this {config.model_type} config uses bidirectional attention (an embedding model, not a "
            f"causal LM); et_transformers exports causal language models only."
        )
    if arch.learned_positions and max_seq_len is not None:
        limit = int(config.max_position_embeddings)
        if max_seq_len > limit:
            raise InvalidConfigError(
                f"max_seq_len={max_seq_len} exceeds {config.model_type}'s learned position table "
                f"({limit} positions): positions past it do not exist. Use max_seq_len<={limit}."
            )
    return arch


def cache_rebuild_length(arch: Architecture, config: Any, max_seq_len: int) -> int | None:
    """Sequence length past which generation must rebuild the KV cache (see
    :attr:`Architecture.rebuilds_cache_past_original_context`), or None when it never has to
    within ``max_seq_len`` positions."""
    if not arch.rebuilds_cache_past_original_context:
        return None
    original = getattr(config, "original_max_position_embeddings", None)
    if original is None or int(original) >= max_seq_len:
        return None
    return int(original)
