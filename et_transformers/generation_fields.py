"""Which ``GenerationConfig`` fields ``generate()`` honours: an allow-list, and what to do with the rest.

A field is honoured when generate() implements it (:data:`SUPPORTED_FIELDS`,
:data:`OUTPUT_FIELDS`), is bookkeeping transformers writes itself (:data:`BOOKKEEPING_FIELDS`),
or holds its default; anything else is refused: :mod:`.planning` raises ``ValueError`` naming a
field the user set, and a model's own ``generation_config.json`` carrying one is cleaned once at
load (:func:`drop_refused_fields`, one warning). A deny-list would let every new transformers
feature through silently.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from transformers import GenerationConfig

logger = logging.getLogger(__name__)

#: GenerationConfig fields generate() honours.
SUPPORTED_FIELDS = (
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "min_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "remove_invalid_values",
    "sequence_bias",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "stop_strings",
    "max_time",
    "prompt_lookup_num_tokens",
    "max_matching_ngram_size",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
)

#: What ``generate(return_dict_in_generate=True, ...)`` fills, as transformers does.
OUTPUT_FIELDS = ("return_dict_in_generate", "output_scores", "output_logits")

#: Fields transformers writes itself, or that cannot change what a decoder-only generate() returns.
BOOKKEEPING_FIELDS = ("_from_model_config", "transformers_version", "compile_config", "disable_compile")

#: Why some well-known fields are refused (any other field outside the allow-list gets a generic reason).
REFUSAL_REASONS: dict[str, str] = {
    "num_beams": "beam search needs several KV caches; the program holds one sequence",
    "num_beam_groups": "beam search is not supported",
    "diversity_penalty": "it only applies to group beam search, which is not supported",
    "early_stopping": "it only applies to beam search, which is not supported",
    "length_penalty": "it only applies to beam search, which is not supported",
    "constraints": "constrained beam search is not supported",
    "force_words_ids": "constrained beam search is not supported",
    "penalty_alpha": "contrastive search is not supported",
    "low_memory": "it only applies to contrastive search, which is not supported",
    "dola_layers": "DoLa decoding needs hidden states; the program returns logits only",
    "token_healing": "token healing is not supported",
    "guidance_scale": "classifier-free guidance needs a second forward per step",
    "num_return_sequences": "generate one sequence per prompt (repeat the prompt for more)",
    "output_attentions": "the program returns logits only",
    "output_hidden_states": "the program returns logits only",
    "assistant_confidence_threshold": "drafts have a fixed length per step (num_assistant_tokens)",
    "assistant_early_exit": "self-speculation from early layers needs hidden states; the program returns logits only",
    "assistant_lookbehind": "the assistant shares the tokenizer: no token realignment is needed or done",
    "target_lookbehind": "the assistant shares the tokenizer: no token realignment is needed or done",
    "watermarking_config": "watermarking is not supported",
    "top_h": "top-h sampling is not supported",
    "encoder_repetition_penalty": "the model has no encoder",
    "encoder_no_repeat_ngram_size": "the model has no encoder",
    "use_cache": "the program always uses its KV cache",
    "cache_implementation": "the program's KV cache is fixed when it is exported",
    "cache_config": "the program's KV cache is fixed when it is exported",
    "prefill_chunk_size": "prefill runs in chunks of the program's max_seq_len",
}

#: Values that switch a feature off besides the defaults (transformers treats them so).
_ALSO_OFF: dict[str, tuple[Any, ...]] = {"guidance_scale": (1, 1.0)}

_HONOURED = frozenset(SUPPORTED_FIELDS + OUTPUT_FIELDS + BOOKKEEPING_FIELDS)


@functools.cache
def _defaults() -> tuple[GenerationConfig, dict[str, Any]]:
    """A blank ``GenerationConfig`` (never modified) and the values transformers' generate() fills in."""
    blank = GenerationConfig()
    return blank, blank._get_default_generation_params()


def refused_fields(gc: GenerationConfig) -> dict[str, Any]:
    """The fields of ``gc`` set to something generate() does not honour, as ``{name: value}``.

    An allow-list: a field is fine when generate() honours it (:data:`SUPPORTED_FIELDS`,
    :data:`OUTPUT_FIELDS`), is bookkeeping (:data:`BOOKKEEPING_FIELDS`), or holds its default
    (``GenerationConfig()``'s value, or the one transformers' generate() fills in for it).
    Everything else, including custom entries, is refused.
    """
    blank, effective = _defaults()
    refused = {}
    for name, value in gc.to_dict().items():
        default = getattr(blank, name, None)
        if name in _HONOURED or value == default or (value is False and default is None):
            continue  # False is what a model config's "off" flags (output_attentions...) hold
        if value in _ALSO_OFF.get(name, ()):
            continue
        if name in effective and value == effective[name]:
            continue
        refused[name] = value
    return refused


def refusal(fields: dict[str, Any]) -> str:
    """``name=value (why it is refused)`` for each field, joined for a message."""
    return "; ".join(
        f"{name}={value!r} ({REFUSAL_REASONS.get(name, 'generate() does not implement it')})"
        for name, value in fields.items()
    )


def drop_refused_fields(gc: GenerationConfig, where: str) -> None:
    """Reset the fields :func:`refused_fields` finds in a model's own config, with one warning.

    Args:
        gc: the config to clean in place (a model's ``generation_config``).
        where: how to name its origin in the warning (e.g. the folder holding it).
    """
    fields = refused_fields(gc)
    if not fields:
        return
    logger.warning(
        "Ignoring generation setting(s) from %s that et_transformers does not implement: %s. "
        "They are reset to their defaults.", where, refusal(fields),
    )
    blank, _ = _defaults()
    for name in fields:
        if hasattr(blank, name):
            setattr(gc, name, getattr(blank, name))
        else:
            delattr(gc, name)
