"""Pull-based streaming: per-token :class:`GenerationResponse` records over the generation loop.

:func:`stream` consumes the same decode loop as ``generate()`` (:meth:`.Generator.steps`) and
turns each step into a record, in the style of mlx-lm's ``stream_generate``: the token, the text it
adds, its log-probability, running counts and rates, and on the last record why generation
stopped. :class:`TextDeltas` owns the text: it decodes incrementally (a window of recent tokens,
not the whole reply each step), holds back text that ends in an incomplete UTF-8 sequence, and
holds back a tail that may still become a stop string.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .generation import GenerationStats, Generator
from .generation_fields import OUTPUT_FIELDS


@dataclass(frozen=True, slots=True)
class GenerationResponse:
    """One new token of a stream.

    Attributes:
        token: the token id.
        text: the text this token adds (``""`` while it is held back: an incomplete multi-byte
            character, or a tail that may still become a stop string); ``None`` without a
            tokenizer. Joined over a stream, the reply decoded without special tokens, cut before a
            matched stop string.
        logprob: log-softmax of the processed scores at ``token`` (``None`` with ``logprobs=False``).
        top_logprobs: the ``top_logprobs`` most likely ``(token id, logprob)`` pairs, best first,
            from the same distribution (``None`` unless asked for).
        prompt_tokens: prompt tokens prefilled for this stream.
        prompt_tokens_per_s: prefill rate.
        generation_tokens: tokens generated so far, this one included.
        generation_tokens_per_s: tokens after the first per second since the first (``None`` for
            the first).
        finish_reason: on the last record only: ``"eos"``, ``"length"``, ``"stop_string"``,
            ``"context"`` (the program's context is full), ``"max_time"`` or ``"criteria"`` (a
            custom stopping criterion).
    """

    token: int
    text: str | None
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    prompt_tokens: int
    prompt_tokens_per_s: float | None
    generation_tokens: int
    generation_tokens_per_s: float | None
    finish_reason: str | None = None


class TextDeltas:
    """Incremental detokenization of a reply, one token at a time.

    Args:
        tokenizer: a transformers tokenizer.
        stop_strings: text that ends the reply; a tail that may still grow into one is held back.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self._ids: list[int] = []
        self._prefix = 0  # the decoded window starts here
        self._read = 0  # tokens before this are in the returned (or pending) text
        self._pending = ""  # decoded but held back for a stop string

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text ``token`` adds that is safe to show now (possibly ``""``)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        # Decoding a window, not just the new token, keeps the spaces and merges a tokenizer
        # applies between tokens; a trailing U+FFFD is an incomplete UTF-8 sequence.
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._pending += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        hold = self._stop_string_tail()
        shown, self._pending = self._pending[: len(self._pending) - hold], self._pending[len(self._pending) - hold :]
        return shown

    def _stop_string_tail(self) -> int:
        """Length of the longest tail of the pending text that is a start of a stop string (or one whole:
        the stopping criterion sees it this step, and the end of the stream cuts it)."""
        text = self._pending
        return max(
            (k for s in self.stop_strings for k in range(min(len(s), len(text)), 0, -1) if text.endswith(s[:k])),
            default=0,
        )

    def finish(self, stopped_by_string: bool) -> str:
        """The text still held back, at the end of the reply (cut before a matched stop string)."""
        rest = self._decode(self._ids[self._prefix :])[len(self._decode(self._ids[self._prefix : self._read])) :]
        text, self._pending = self._pending + rest, ""
        if stopped_by_string:
            found = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
            text = text[: min(found)] if found else text
        return text


def _stop_strings(value) -> tuple[str, ...]:
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def stream(
    generator: Generator,
    default_generation_config,
    input_ids,
    *,
    cached_prefix: int = 0,
    logprobs: bool = True,
    top_logprobs: int = 0,
    on_finish: Callable[[GenerationStats, list[int]], None] | None = None,
    **kwargs: Any,
) -> Iterator[GenerationResponse]:
    """Validate a call now and return an iterator of :class:`GenerationResponse`, one per new token.

    Args:
        generator: the model's :class:`~et_transformers.generation.Generator`.
        default_generation_config: the model's ``generation_config``.
        input_ids: one prompt, ``[1, seq]`` or ``[seq]``.
        cached_prefix: see :meth:`~et_transformers.generation.Generator.generate`.
        logprobs: compute each token's log-probability (one log-sum-exp over the vocabulary).
        top_logprobs: also report this many most likely tokens per step (0: none).
        on_finish: called with the final stats and the new token ids when the stream ends, is
            closed or is garbage collected. The stats' decode time is the wall time from the first
            record to the last, including what the consumer does in between.
        **kwargs: as ``ETModelForCausalLM.generate`` takes them (no streamer).

    Returns:
        An iterator; the program's lock is taken at its first step and released when it ends,
        is closed or is garbage collected.

    Raises:
        ValueError: invalid options (as ``generate()``), a batch of more than one prompt, a
            negative ``top_logprobs``, a ``streamer`` or ``return_dict_in_generate`` /
            ``output_scores`` / ``output_logits``; raised by this call, before iterating.
    """
    if not isinstance(top_logprobs, int) or top_logprobs < 0:
        raise ValueError(f"top_logprobs={top_logprobs!r} must be a non-negative integer (0: none).")
    if "streamer" in kwargs:
        raise ValueError("stream_generate is itself the stream: iterate it, or pass streamer= to generate().")
    t_start = time.perf_counter()
    plan_ = generator.prepare(default_generation_config, input_ids, **kwargs)
    asked = [name for name in OUTPUT_FIELDS if getattr(plan_.generation_config, name, None)]
    if asked:
        raise ValueError(
            f"{', '.join(f'{name}=True' for name in asked)} apply to generate(); a stream's records carry "
            f"each token's logprob (and top_logprobs=k) instead."
        )
    batch = plan_.input_ids.shape[0]
    if batch != 1:
        raise ValueError(
            f"stream_generate takes one prompt at a time; got a batch of {batch}. Stream each prompt "
            f"on its own, or use generate() for batches."
        )
    generator.check_cached_prefix(plan_, cached_prefix)
    tokenizer = kwargs.get("tokenizer") or generator.tokenizer
    stop = _stop_strings(plan_.generation_config.stop_strings)
    return _records(generator, plan_, t_start, cached_prefix, logprobs, top_logprobs, tokenizer, stop, on_finish)


def _records(generator, plan_, t_start, cached_prefix, logprobs, top_k, tokenizer, stop, on_finish):
    stats = GenerationStats()
    text = TextDeltas(tokenizer, stop) if tokenizer is not None else None
    new: list[int] = []
    with generator.program.lock:  # held until the stream ends, is closed or is garbage collected
        steps = generator.steps(plan_, 0, stats, t_start, cached_prefix)
        try:
            t_first = None
            for token, scores, _, finish in steps:
                new.append(token)
                t_first = t_first or time.perf_counter()
                logprob, top = None, None
                if top_k:
                    all_logprobs = torch.log_softmax(scores[0].float(), dim=-1)  # [V]
                    logprob = float(all_logprobs[token])
                    values, ids = torch.topk(all_logprobs, min(top_k, all_logprobs.shape[0]))
                    top = list(zip(ids.tolist(), values.tolist()))
                elif logprobs:
                    row = scores[0].float()
                    logprob = float(row[token] - torch.logsumexp(row, dim=0))
                delta = None
                if text is not None:
                    delta = text.add(token) + (text.finish(finish == "stop_string") if finish else "")
                elapsed = time.perf_counter() - t_first
                record = GenerationResponse(
                    token=token,
                    text=delta,
                    logprob=logprob,
                    top_logprobs=top,
                    prompt_tokens=stats.prompt_tokens,
                    prompt_tokens_per_s=stats.prompt_tokens / stats.prefill_time if stats.prefill_time else None,
                    generation_tokens=len(new),
                    generation_tokens_per_s=(len(new) - 1) / elapsed if len(new) > 1 and elapsed > 0 else None,
                    finish_reason=finish,
                )
                # While the consumer has the record, the hold is nobody's: whichever thread
                # resumes the stream runs it alone; this thread cannot run the model meanwhile.
                generator.program.lock.pause()
                try:
                    yield record
                finally:
                    generator.program.lock.resume()
        finally:
            steps.close()  # adds its decode time to the stats
            if on_finish is not None:
                on_finish(generator.finish_stats(stats, t_start, 1), new)
