"""Assisted generation: who proposes draft tokens, and how many (the verifying is :mod:`.generation`'s).

A proposer returns up to ``limit`` tokens that likely follow the ids so far; the decode loop
runs them through the target program in one call (its ``forward`` returns the logits of its last
``verify_tokens`` positions) and keeps the drafted tokens the target chooses itself, one step
at a time: greedy output is plain greedy output (token for token on float32 programs and on
``q4_0`` and ``8da4w_own`` programs, whose kernels compute each row alike in one- and multi-row calls; an XNNPACK
quantized program's multi-row call can round a near tie the other way), and sampled output
follows the target's distribution (prompt lookup keeps a drafted token when the target's own
sample equals it; a sampled draft model by the rule below).

* :class:`PromptLookup` (``prompt_lookup_num_tokens=``): transformers' n-gram lookup: the longest
  suffix of up to ``max_matching_ngram_size`` tokens that occurred earlier in the sequence, and
  the tokens that followed it there.
* :class:`DraftModel` (``assistant_model=``): another loaded program with the same vocabulary,
  with its own KV cache, drafting greedily (or sampling, when the call samples) with the call's
  logits processors; ``num_assistant_tokens`` and transformers' schedules
  (``"constant"``, ``"heuristic"``, ``"heuristic_transient"``). When sampling, a drafted token
  ``d`` is kept by speculative sampling's rule (:func:`speculative_choice`): with probability
  ``min(1, p(d) / q(d))``, else the token is drawn from ``max(0, p - q)``; the result follows the
  target's distribution ``p`` exactly and keeps more drafts than comparing samples would.

:func:`make_proposer` validates a call's options against the program and builds one.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .generation_fields import _defaults

logger = logging.getLogger(__name__)

#: transformers' ``max_matching_ngram_size`` default for prompt lookup.
DEFAULT_MAX_NGRAM = 2
#: transformers' ``num_assistant_tokens_schedule`` values.
SCHEDULES = ("constant", "heuristic", "heuristic_transient")


class PromptLookup:
    """Drafts by n-gram lookup in the sequence so far (transformers' ``PromptLookupCandidateGenerator``),
    with a draft length that adapts to how the last draft fared (:meth:`feedback`).

    Args:
        num_tokens: most tokens drafted per step (``prompt_lookup_num_tokens``).
        max_ngram: longest suffix matched (``max_matching_ngram_size``); shorter ones are tried
            after it, down to one token.
        eos_ids: a draft is cut after its first end-of-sequence token.
    """

    def __init__(self, num_tokens: int, max_ngram: int = DEFAULT_MAX_NGRAM, eos_ids=()):
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.eos_ids = frozenset(eos_ids)
        #: Tokens the next draft may have: ``num_tokens`` at first, then adapted by :meth:`feedback`.
        self.length = num_tokens

    def propose(self, ids: list[int], limit: int) -> list[int]:
        """Up to ``min(length, limit)`` tokens to follow ``ids``; empty when nothing matches."""
        n_out = min(self.length, limit)
        if n_out <= 0:
            return []
        seq = np.asarray(ids)
        # after a draft whose first token missed, a one-token match is too weak a hint to pay a verify for
        shortest = 2 if self.length == 1 and self.max_ngram >= 2 else 1
        for size in range(min(self.max_ngram, len(ids) - 1), shortest - 1, -1):
            suffix = seq[-size:]
            # windows ending before the suffix itself; the earliest match wins, as in transformers
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], size)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            for start in hits + size:
                draft = seq[start : min(start + n_out, len(ids))].tolist()
                if draft:
                    for i, token in enumerate(draft):
                        if token in self.eos_ids:
                            return draft[: i + 1]
                    return draft
        return []

    def feedback(self, drafted: int, accepted: int) -> None:
        """Adapt the draft length to how the last draft fared: two more (up to ``num_tokens``) after
        a fully accepted one, else one more than it kept. A verify call costs more the more rows it
        scores, so a lookup that keeps missing (open-ended text) drafts short, and one that keeps
        hitting (a passage quoted back) drafts long; the tokens generated are the same either way."""
        if drafted:
            self.length = min(self.num_tokens, self.length + 2) if accepted == drafted else accepted + 1


class DraftModel:
    """Drafts with another program (``assistant_model``), keeping its KV cache in step.

    Args:
        program: the assistant's :class:`~et_transformers.runtime.Program` (its caller holds its lock).
        num_tokens: tokens drafted per step at the start (``num_assistant_tokens``).
        schedule: ``num_assistant_tokens_schedule``.
        processors: the call's logits processors (applied to the draft's logits too).
        do_sample: sample drafts from the processed distribution instead of taking the argmax.
    """

    def __init__(self, program, num_tokens: int, schedule: str, processors, do_sample: bool):
        self.program = program
        self.num_tokens = num_tokens
        self.schedule = schedule
        self.processors = processors
        self.do_sample = do_sample
        self._cached: list[int] = []  # tokens the assistant's cache holds at positions 0..
        self._executions = -1  # the assistant's execution count after our last call
        self._context = program.metadata.max_context_len
        #: When sampling: the draft's processed distribution ``[V]`` each token of the last draft
        #: was sampled from.
        self.probabilities: list[torch.Tensor] = []

    def propose(self, ids: list[int], limit: int) -> list[int]:
        """Up to ``min(num_tokens, limit)`` tokens the assistant would write after ``ids``."""
        n = min(int(self.num_tokens), limit, self._context - len(ids))
        if n <= 0:
            return []
        with self.program.lock:  # reentrant: ours for the call; another thread's work waits
            return self._propose(ids, n)

    def _propose(self, ids: list[int], n: int) -> list[int]:
        from .generation import _choose, prefill

        if self.program.executions != self._executions:
            self._cached = []  # someone else ran the assistant since: its cache holds their tokens
        common = 0
        for a, b in zip(self._cached, ids[:-1]):  # keep one token to feed: its logits are needed
            if a != b:
                break
            common += 1
        logits = prefill(self.program, torch.tensor([ids[common:]], dtype=torch.long), common)
        self._cached = list(ids)
        draft: list[int] = []
        self.probabilities = []
        seq = torch.tensor([ids], dtype=torch.long)
        for i in range(n):
            scores = self.processors(seq, logits) if self.processors else logits
            token = _choose(scores, self.do_sample)
            draft.append(token)
            if self.do_sample:  # q, for speculative sampling's acceptance test
                self.probabilities.append(torch.softmax(scores.float(), dim=-1)[0])
            if i + 1 < n:
                logits = self.program.decode(token, len(self._cached))
                self._cached.append(token)
                seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
        self._executions = self.program.executions
        return draft

    def feedback(self, drafted: int, accepted: int) -> None:
        """transformers' schedule: two more after a fully accepted draft, one fewer otherwise."""
        if self.schedule in ("heuristic", "heuristic_transient") and drafted:
            self.num_tokens = self.num_tokens + 2 if accepted == drafted else max(1, self.num_tokens - 1)


def speculative_choice(scores: torch.Tensor, draft_token: int, q: torch.Tensor) -> int:
    """The target's token at a drafted position, by speculative sampling's acceptance rule.

    Args:
        scores: the target's processed scores ``[1, V]`` there (``p`` is their softmax).
        draft_token: the token the draft sampled.
        q: the draft's processed distribution ``[V]`` it was sampled from.

    Returns:
        ``draft_token`` with probability ``min(1, p(d) / q(d))``; otherwise a sample of the
        normalised ``max(0, p - q)``, which never is ``draft_token``. Either way the token is
        distributed as ``p`` (Leviathan et al., 2023; Chen et al., 2023).
    """
    p = torch.softmax(scores.float(), dim=-1)[0]
    if float(torch.rand(())) * float(q[draft_token]) <= float(p[draft_token]):
        return draft_token
    residual = (p - q).clamp(min=0)
    residual[draft_token] = 0  # already 0 unless rounding left a trace
    total = float(residual.sum())
    if total <= 0:  # p == q up to rounding: nothing to correct
        return int(torch.multinomial(p, 1))
    return int(torch.multinomial(residual / total, 1))


def make_proposer(gc, program, assistant: Any, processors, eos_ids, batch: int):
    """The proposer a call asks for (``None`` when it asks for none).

    Args:
        gc: the call's merged ``GenerationConfig``.
        program: the target :class:`~et_transformers.runtime.Program`.
        assistant: ``assistant_model``: an ``ETModelForCausalLM`` (or ``None``).
        processors: the row's logits processors.
        eos_ids: the call's end-of-sequence ids.
        batch: prompts in the call.

    Raises:
        ValueError: both kinds of assistance at once, a batch, a program that cannot verify
            drafts, draft lengths beyond what one call verifies, or an assistant whose vocabulary
            differs or that shares the target's program.
    """
    lookup = gc.prompt_lookup_num_tokens
    if lookup is None and assistant is None:
        return None
    if lookup is not None and assistant is not None:
        raise ValueError("pass prompt_lookup_num_tokens or assistant_model, not both.")
    if batch > 1:
        raise ValueError(f"assisted generation takes one prompt at a time; got a batch of {batch}.")
    k = program.metadata.verify_tokens
    if k < 2:
        raise ValueError(
            f"{program.path} returns the last position's logits only (verify_tokens={k}), so it cannot "
            f"verify a draft. Export it with ExportConfig(verify_tokens=8) (CLI: --verify-tokens 8) to "
            f"verify up to 7 drafted tokens per call."
        )
    if lookup is not None:
        if isinstance(lookup, bool) or not isinstance(lookup, int) or not 1 <= lookup <= k - 1:
            raise ValueError(
                f"prompt_lookup_num_tokens={lookup!r} is not valid for this program: it verifies at most "
                f"{k - 1} drafted tokens per call (verify_tokens={k}). Pass 1..{k - 1}, or export with a "
                f"larger ExportConfig(verify_tokens=...)."
            )
        ngram = gc.max_matching_ngram_size if gc.max_matching_ngram_size is not None else DEFAULT_MAX_NGRAM
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
            raise ValueError(f"max_matching_ngram_size={ngram!r} must be a positive integer.")
        return PromptLookup(lookup, ngram, eos_ids)
    draft_program = getattr(assistant, "program", None)
    if draft_program is None or not hasattr(draft_program, "decode"):
        raise ValueError(
            f"assistant_model must be an ETModelForCausalLM; got {type(assistant).__name__}."
        )
    if draft_program is program:
        raise ValueError("assistant_model is this model itself: load a second ETModelForCausalLM (its own cache).")
    if draft_program.metadata.vocab_size != program.metadata.vocab_size:
        raise ValueError(
            f"assistant_model's vocabulary ({draft_program.metadata.vocab_size} tokens) differs from this "
            f"model's ({program.metadata.vocab_size}); a draft model must share the tokenizer."
        )
    schedule = gc.num_assistant_tokens_schedule or "constant"
    if schedule not in SCHEDULES:
        raise ValueError(f"num_assistant_tokens_schedule={schedule!r} is not valid; use one of {list(SCHEDULES)}.")
    num = gc.num_assistant_tokens
    if num is None or num == _defaults()[1].get("num_assistant_tokens"):
        num = min(k - 1, num or k - 1)  # transformers' default (20) does not fit one verify call
    if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= k - 1:
        raise ValueError(
            f"num_assistant_tokens={num!r} is not valid for this program: it verifies at most {k - 1} "
            f"drafted tokens per call (verify_tokens={k}). Pass 1..{k - 1}, or export with a larger "
            f"ExportConfig(verify_tokens=...)."
        )
    return DraftModel(draft_program, num, schedule, processors, bool(gc.do_sample))
