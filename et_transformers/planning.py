"""Deciding *what* ``generate()`` produces: config merging, input checks, processors and stopping criteria.

This mirrors, step for step, how transformers' ``GenerationMixin.generate`` prepares a call
(``_prepare_generation_config``, ``_prepare_special_tokens``, attention-mask inference,
``_prepare_generated_length``, ``_get_logits_processor``, ``_get_stopping_criteria``), using
transformers' own ``GenerationConfig``, logits processors and stopping criteria. We do not import
``GenerationMixin`` itself: its module pulls in torch's compiler and distributed stacks (about 1.5 s),
which would be most of a cached model's load time. Tests compare the result with
``GenerationMixin``'s, processor by processor and token by token.

Everything here runs before the program does, so bad input raises ``ValueError`` (naming the value
and the limit) without touching the runtime.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp
from transformers.generation import stopping_criteria as sc

from .errors import TokenizerError
from .generation_fields import OUTPUT_FIELDS, SUPPORTED_FIELDS, drop_refused_fields, refusal, refused_fields

logger = logging.getLogger(__name__)

@dataclass
class GenerationPlan:
    """Everything ``generate()`` decided before running the program.

    Attributes:
        input_ids: the prompts ``[batch, seq]`` (int64).
        attention_mask: ``[batch, seq]``, left padding as zeros.
        generation_config: the merged, validated config (``max_length`` final).
        logits_processors: per row, the processors in transformers' order (per row because some
            hold per-row state, e.g. the repetition penalty's padding length).
        stopping_criteria: the stopping criteria.
        pad_token_id: what fills a row after it stopped.
        assistant: ``assistant_model`` (another ``ETModelForCausalLM``) drafting for the call, if any.
        rng: the ``torch.Generator`` sampling draws from (``None``: torch's global RNG).
        image_features: image-text-to-text prompts: ``(positions [n], features [n, hidden])``, the
            embeddings that replace the prompt's image tokens during prefill (``None``: text only).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    generation_config: GenerationConfig
    logits_processors: list[lp.LogitsProcessorList]
    stopping_criteria: sc.StoppingCriteriaList
    pad_token_id: int
    assistant: Any = None
    rng: torch.Generator | None = None
    image_features: tuple[torch.Tensor, torch.Tensor] | None = None


def merge_config(default: GenerationConfig, generation_config: GenerationConfig | None, kwargs: dict[str, Any]):
    """The call's config: ``generation_config`` (or a blank one) filled from the model's default and
    the global defaults, then ``kwargs`` on top; returns ``(config, names the user set)``.

    Raises:
        ValueError: an unknown keyword, or an unsupported feature the user asked for.
    """
    gc = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    gc.update(**default.to_dict(), defaults_only=True, allow_custom_entries=True)
    gc.update(**default._get_default_generation_params(), defaults_only=True)
    unknown = gc.update(**kwargs)
    if unknown:
        raise ValueError(
            f"generate() got unknown or unsupported keyword argument(s) {sorted(unknown)}. It accepts "
            f"GenerationConfig fields (supported: {', '.join(SUPPORTED_FIELDS)}) and input_ids, "
            f"attention_mask, generation_config, streamer, logits_processor, stopping_criteria, tokenizer, "
            f"response_format, assistant_model, rng."
        )
    user = set(kwargs) | (set(generation_config.to_diff_dict()) if generation_config is not None else set())
    refused = refused_fields(gc)
    asked = {name: value for name, value in refused.items() if name in user}
    if asked:
        raise ValueError(
            f"generate() does not support {refusal(asked)}. Remove {'it' if len(asked) == 1 else 'them'}; "
            f"the supported GenerationConfig fields are {', '.join(SUPPORTED_FIELDS + OUTPUT_FIELDS)}."
        )
    drop_refused_fields(gc, "the model's generation config")
    return gc, user


def _special_tokens(gc: GenerationConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(eos [n] or None, pad scalar or None)`` as transformers derives them (pad defaults to eos[0])."""

    def as_tensor(token):
        return None if token is None else torch.as_tensor(token, dtype=torch.long)

    eos, pad = as_tensor(gc.eos_token_id), as_tensor(gc.pad_token_id)
    if eos is not None and eos.ndim == 0:
        eos = eos.unsqueeze(0)
    if pad is None and eos is not None and eos.numel():
        pad = eos[0]
    return (eos if eos is not None and eos.numel() else None), pad


def check_input_ids(input_ids, vocab_size: int) -> torch.Tensor:
    """The prompts as an int64 ``[batch, seq]`` tensor.

    Raises:
        ValueError: missing, wrongly shaped, empty, or holding ids outside ``[0, vocab_size)``.
    """
    if input_ids is None:
        raise ValueError("generate() needs input_ids (a LongTensor [batch, seq]); tokenize your prompt first.")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
        raise ValueError(
            f"input_ids must be an integer tensor [batch, seq]; got {tuple(input_ids.shape)} {input_ids.dtype}."
        )
    if input_ids.shape[-1] == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token.")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} in input_ids is outside the vocabulary [0, {vocab_size}).")
    return input_ids.long()


def attention_mask_for(input_ids, attention_mask, eos, pad) -> torch.Tensor:
    """The given mask checked for left padding, or one inferred from ``pad`` as transformers does.

    Raises:
        ValueError: wrong shape, an empty row, or right padding.
    """
    if attention_mask is None:
        mask = torch.ones_like(input_ids)
        if pad is not None and bool((input_ids == pad).any()) and (eos is None or not bool(torch.isin(eos, pad).any())):
            mask = input_ids.ne(pad).long()
    else:
        mask = torch.as_tensor(attention_mask).long()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(input_ids.shape)}.")
    for b, row in enumerate(mask):
        ones = row.nonzero()
        if len(ones) == 0:
            raise ValueError(f"row {b} of attention_mask is all zeros: that prompt is empty.")
        if int(ones[-1]) - int(ones[0]) + 1 != len(ones) or int(ones[-1]) != row.shape[0] - 1:
            raise ValueError(
                f"row {b} of attention_mask is not left-padded (mask {row.tolist()}); decoder-only "
                f"generation needs left padding: set tokenizer.padding_side = 'left'."
            )
    return mask


def prepare_lengths(gc: GenerationConfig, user: set[str], prompt_len: int, max_position_embeddings) -> None:
    """Turn ``max_new_tokens``/``min_new_tokens`` into absolute lengths, as transformers does."""
    if gc.max_new_tokens is not None:
        gc.max_length = gc.max_new_tokens + prompt_len
    elif "max_length" not in user:  # the default 20 counts new tokens
        gc.max_length = gc.max_length + prompt_len
        if max_position_embeddings is not None:
            gc.max_length = min(gc.max_length, max_position_embeddings)
    if gc.min_new_tokens is not None:
        gc.min_length = gc.min_new_tokens + prompt_len
    if prompt_len >= gc.max_length:
        raise ValueError(
            f"the input has {prompt_len} tokens but max_length={gc.max_length}; set max_new_tokens instead."
        )


def check_sampling_values(gc: GenerationConfig) -> None:
    """Reject out-of-range sampling values with messages that name the value and the limit."""
    if not gc.do_sample:
        return
    if gc.temperature is not None and not gc.temperature > 0:
        raise ValueError(
            f"temperature={gc.temperature} is not valid with do_sample=True: it must be > 0. "
            f"For greedy decoding pass do_sample=False."
        )
    if gc.top_p is not None and not 0 < gc.top_p <= 1:
        raise ValueError(f"top_p={gc.top_p} is outside (0, 1].")
    if gc.top_k is not None and (not isinstance(gc.top_k, int) or gc.top_k < 0):
        raise ValueError(f"top_k={gc.top_k} must be a non-negative integer (0 disables it).")
    if gc.min_p is not None and not 0 <= gc.min_p <= 1:
        raise ValueError(f"min_p={gc.min_p} is outside [0, 1].")


def _merge(default_list, custom_list):
    """transformers' rule: a custom entry replaces a default of the same type; the rest append."""
    if not custom_list:
        return default_list
    merged = type(default_list)()
    for default in default_list:
        replacement = next((c for c in custom_list if type(c) is type(default)), None)
        merged.append(replacement if replacement is not None else default)
    for custom in custom_list:
        if custom not in merged:
            merged.append(custom)
    return merged


def build_logits_processors(gc, eos, prompt_len: int, mask_row: torch.Tensor, custom) -> lp.LogitsProcessorList:
    """The processors transformers' ``_get_logits_processor`` builds, in its order, for one row."""
    p = lp.LogitsProcessorList()
    if gc.sequence_bias is not None:
        p.append(lp.SequenceBiasLogitsProcessor(sequence_bias=gc.sequence_bias))
    if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
        padding = (mask_row[None] != 0).int().argmax(dim=1)
        p.append(lp.RepetitionPenaltyLogitsProcessor(gc.repetition_penalty, prompt_ignore_length=padding))
    if gc.no_repeat_ngram_size is not None and gc.no_repeat_ngram_size > 0:
        p.append(lp.NoRepeatNGramLogitsProcessor(gc.no_repeat_ngram_size))
    if gc.bad_words_ids is not None:
        p.append(lp.NoBadWordsLogitsProcessor(gc.bad_words_ids, eos))
    if gc.min_length is not None and eos is not None and gc.min_length > 0:
        p.append(lp.MinLengthLogitsProcessor(gc.min_length, eos, device="cpu"))
    if gc.min_new_tokens is not None and eos is not None and gc.min_new_tokens > 0:
        p.append(lp.MinNewTokensLengthLogitsProcessor(prompt_len, gc.min_new_tokens, eos, device="cpu"))
    if gc.forced_bos_token_id is not None:
        p.append(lp.ForcedBOSTokenLogitsProcessor(gc.forced_bos_token_id))
    if gc.forced_eos_token_id is not None:
        p.append(lp.ForcedEOSTokenLogitsProcessor(gc.max_length, gc.forced_eos_token_id, device="cpu"))
    if gc.remove_invalid_values is True:
        p.append(lp.InfNanRemoveLogitsProcessor())
    if gc.exponential_decay_length_penalty is not None:
        p.append(lp.ExponentialDecayLengthPenalty(gc.exponential_decay_length_penalty, eos, prompt_len))
    if gc.suppress_tokens is not None:
        p.append(lp.SuppressTokensLogitsProcessor(gc.suppress_tokens, device="cpu"))
    if gc.begin_suppress_tokens is not None:
        begin = prompt_len if (prompt_len > 1 or gc.forced_bos_token_id is None) else prompt_len + 1
        p.append(lp.SuppressTokensAtBeginLogitsProcessor(gc.begin_suppress_tokens, begin, device="cpu"))
    p = _merge(p, custom)
    if gc.do_sample:
        keep = 1
        if gc.temperature is not None and gc.temperature != 1.0:
            p.append(lp.TemperatureLogitsWarper(gc.temperature))
        if gc.top_k is not None and gc.top_k != 0:
            p.append(lp.TopKLogitsWarper(top_k=gc.top_k, min_tokens_to_keep=keep))
        if gc.top_p is not None and gc.top_p < 1.0:
            p.append(lp.TopPLogitsWarper(top_p=gc.top_p, min_tokens_to_keep=keep))
        if gc.min_p is not None:
            p.append(lp.MinPLogitsWarper(min_p=gc.min_p, min_tokens_to_keep=keep))
        if gc.typical_p is not None and gc.typical_p < 1.0:
            p.append(lp.TypicalLogitsWarper(mass=gc.typical_p, min_tokens_to_keep=keep))
        if gc.epsilon_cutoff is not None and 0.0 < gc.epsilon_cutoff < 1.0:
            p.append(lp.EpsilonLogitsWarper(epsilon=gc.epsilon_cutoff, min_tokens_to_keep=keep))
        if gc.eta_cutoff is not None and 0.0 < gc.eta_cutoff < 1.0:
            p.append(lp.EtaLogitsWarper(epsilon=gc.eta_cutoff, min_tokens_to_keep=keep, device="cpu"))
    if gc.renormalize_logits is True:
        p.append(lp.LogitNormalization())
    return p


def build_stopping_criteria(gc, eos, custom, tokenizer, max_position_embeddings) -> sc.StoppingCriteriaList:
    """The criteria transformers' ``_get_stopping_criteria`` builds, in its order."""
    criteria = sc.StoppingCriteriaList()
    if gc.max_length is not None:
        criteria.append(sc.MaxLengthCriteria(gc.max_length, max_position_embeddings=max_position_embeddings))
    if gc.max_time is not None:
        criteria.append(sc.MaxTimeCriteria(max_time=gc.max_time))
    if gc.stop_strings is not None:
        if tokenizer is None:
            raise TokenizerError("stop_strings needs a tokenizer: pass tokenizer= to generate().")
        criteria.append(sc.StopStringCriteria(stop_strings=gc.stop_strings, tokenizer=tokenizer))
    if eos is not None:
        criteria.append(sc.EosTokenCriteria(eos_token_id=eos))
    return _merge(criteria, custom)


def fit_context(gc: GenerationConfig, mask: torch.Tensor, user: set[str], context: int) -> None:
    """Make ``gc.max_length`` fit a context of ``context`` positions.

    Raises:
        ValueError: the prompt does not fit, or the user asked for more new tokens than fit.
    """
    padding = int((mask == 0).sum(dim=-1).min())  # the row with least padding uses the most context
    longest_prompt = mask.shape[-1] - padding
    if longest_prompt >= context:
        raise ValueError(
            f"the prompt has {longest_prompt} tokens but the program's context holds {context} "
            f"(max_seq_len); shorten the prompt or export with a larger max_seq_len."
        )
    needed = gc.max_length - padding  # positions the longest row would occupy
    if needed <= context:
        return
    if "max_new_tokens" in user or "max_length" in user:
        name = "max_new_tokens" if gc.max_new_tokens is not None else "max_length"
        wanted = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length
        raise ValueError(
            f"{name}={wanted} with a {longest_prompt}-token prompt needs {needed} positions but the "
            f"program's context holds {context}: at most {context - longest_prompt} new tokens fit. "
            f"Lower {name} or export with a larger max_seq_len."
        )
    warnings.warn(
        f"the default max_length ({gc.max_length}) does not fit the program's context: generation "
        f"will stop at the end of the program's context ({context} tokens).",
        UserWarning,
        stacklevel=4,
    )
    gc.max_length = context + padding


def constrain(response_format, tokenizer, vocab_size: int, eos, pad: int, prompt_len: int, processors,
              criteria) -> None:
    """Add ``response_format``'s grammar mask first to each row's processors (it sees the program's
    logits before transformers' processors do) and its completion to the stopping criteria; ``pad``
    is what a stopped row of a batch is run on with.

    Raises:
        TokenizerError: no tokenizer (the grammar is compiled against its vocabulary).
        ConstraintError: see :class:`~et_transformers.constraints.GrammarLogitsProcessor`.
    """
    from .constraints import GrammarLogitsProcessor, grammar_for  # imports llguidance: only when asked

    if grammar_for(response_format) is None:  # {"type": "text"}
        return
    if tokenizer is None:
        raise TokenizerError("response_format needs a tokenizer (the grammar is compiled against its vocabulary): "
                             "pass tokenizer= to generate().")
    eos_ids = None if eos is None else eos.tolist()
    processor = GrammarLogitsProcessor(response_format, tokenizer, vocab_size=vocab_size, eos_token_id=eos_ids,
                                       prompt_length=prompt_len, pad_token_id=pad)
    for row in processors:
        row.insert(0, processor)
    criteria.append(processor.stopping_criteria)


def plan(
    *,
    default_generation_config: GenerationConfig,
    max_position_embeddings: int | None,
    context: int,
    vocab_size: int,
    input_ids,
    attention_mask=None,
    generation_config: GenerationConfig | None = None,
    logits_processor=None,
    stopping_criteria=None,
    tokenizer=None,
    **kwargs: Any,
) -> GenerationPlan:
    """Validate a ``generate()`` call and build what it needs, without running the program.

    Args:
        default_generation_config: the model's ``generation_config``.
        max_position_embeddings: the model config's value, which caps a default ``max_length``.
        context: positions in the program's KV cache.
        vocab_size: size of the program's logits.
        input_ids, attention_mask, generation_config, logits_processor, stopping_criteria,
        tokenizer, kwargs: as ``ETModelForCausalLM.generate`` takes them.

    Raises:
        ValueError: see ``ETModelForCausalLM.generate``.
    """
    assistant = kwargs.pop("assistant_model", None)
    rng = kwargs.pop("rng", None)
    response_format = kwargs.pop("response_format", None)
    gc, user = merge_config(default_generation_config, generation_config, kwargs)
    if rng is not None:
        if not isinstance(rng, torch.Generator):
            raise ValueError(f"rng={rng!r} must be a torch.Generator (e.g. torch.Generator().manual_seed(0)).")
        if assistant is not None or gc.prompt_lookup_num_tokens:
            raise ValueError(
                "rng= applies to plain sampling; assisted generation draws from torch's global RNG "
                "(seed it with torch.manual_seed)."
            )
    input_ids = check_input_ids(input_ids, vocab_size)
    prompt_len = input_ids.shape[-1]
    eos, pad = _special_tokens(gc)
    mask = attention_mask_for(input_ids, attention_mask, eos, pad)
    max_pos = max_position_embeddings
    prepare_lengths(gc, user, prompt_len, max_pos)
    fit_context(gc, mask, user, context)
    check_sampling_values(gc)
    gc.validate()
    custom_processors = logits_processor if logits_processor is not None else lp.LogitsProcessorList()
    processors = [build_logits_processors(gc, eos, prompt_len, mask[b], custom_processors) for b in range(len(mask))]
    custom_criteria = stopping_criteria if stopping_criteria is not None else sc.StoppingCriteriaList()
    criteria = build_stopping_criteria(gc, eos, custom_criteria, tokenizer, max_pos)
    pad_id = int(pad) if pad is not None else 0
    if response_format is not None:
        constrain(response_format, tokenizer, vocab_size, eos, pad_id, prompt_len, processors, criteria)
    return GenerationPlan(input_ids, mask, gc, processors, criteria, pad_id, assistant, rng)
