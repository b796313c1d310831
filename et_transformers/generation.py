"""The generation loop over an ExecuTorch program: prefill, decode, sample, stop, stream, measure.

:mod:`.planning` decides what a ``generate()`` call produces (transformers' semantics); this
module feeds the program: one prompt at a time through its single KV cache, the last position's
logits only, transformers' processors and stopping criteria applied to them, and honest timing in
:class:`GenerationStats`.

Batches: rows run one after another, each seeing exactly the ids transformers would give it (its
left padding included), and the result is assembled as transformers returns it: prompt + new
tokens, padded with ``pad_token_id`` after a row stops. Processors and stopping criteria therefore
see ``[1, ...]`` tensors.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from transformers.generation import stopping_criteria as sc

from .planning import GenerationPlan, plan
from .runtime import Program

logger = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """What the last load or ``generate()`` call measured (times in seconds).

    Attributes:
        load_time: wall time of loading the program, including the warm-up run.
        export_time: wall time of the export, when this load had to export.
        prompt_tokens: prompt tokens prefilled (padding and tokens already cached excluded), all rows.
        generated_tokens: new tokens produced, all rows.
        time_to_first_token: from the start of ``generate()`` to the first new token of row 0.
        prefill_time: time spent in prefill forwards.
        decode_time: time spent producing tokens after each row's first.
        prefill_tokens_per_s: ``prompt_tokens / prefill_time``.
        decode_tokens_per_s: tokens after each row's first, per second of decode.
        total_time: wall time of the call.
        peak_rss_bytes: peak resident memory of the process so far.
        extra: anything else a caller measured (e.g. per-phase profile times).
    """

    load_time: float = 0.0
    export_time: float | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float | None = None
    prefill_time: float = 0.0
    decode_time: float = 0.0
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    total_time: float = 0.0
    peak_rss_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The stats as a plain dict."""
        return asdict(self)

    def summary(self) -> str:
        """One human-readable line."""
        parts = [f"prompt {self.prompt_tokens} tok", f"generated {self.generated_tokens} tok"]
        if self.time_to_first_token is not None:
            parts.append(f"TTFT {self.time_to_first_token * 1000:.0f} ms")
        if self.prefill_tokens_per_s:
            parts.append(f"prefill {self.prefill_tokens_per_s:.1f} tok/s")
        if self.decode_tokens_per_s:
            parts.append(f"decode {self.decode_tokens_per_s:.1f} tok/s")
        parts.append(f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")
        return ", ".join(parts)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _simple_stop(criteria) -> tuple[int, frozenset[int]] | None:
    """``(max_length, eos ids)`` if ``criteria`` hold only transformers' max-length and EOS criteria
    (the common case), so the loop can test them on Python ints instead of tensors; else None."""
    max_length, eos = None, frozenset()
    for c in criteria:
        if type(c) is sc.MaxLengthCriteria:
            max_length = c.max_length if max_length is None else min(max_length, c.max_length)
        elif type(c) is sc.EosTokenCriteria:
            eos = eos | frozenset(int(e) for e in c.eos_token_id.flatten().tolist())
        else:
            return None
    return None if max_length is None else (max_length, eos)


def _is_transformers_own(obj) -> bool:
    """True for an instance of a class defined in transformers itself (not a user's subclass)."""
    return type(obj).__module__.startswith("transformers.")


class Generator:
    """Runs ``generate()`` for one program.

    Args:
        program: the loaded :class:`~et_transformers.runtime.Program`.
        max_position_embeddings: from the model config, if known (caps a default ``max_length``).
        tokenizer: the model's tokenizer (used for ``stop_strings`` when none is passed).
    """

    def __init__(self, program: Program, max_position_embeddings: int | None = None, tokenizer=None):
        self.program = program
        self.max_position_embeddings = max_position_embeddings
        self.tokenizer = tokenizer

    def prepare(self, default_generation_config, input_ids, **kwargs: Any) -> GenerationPlan:
        """Validate a call and build its processors/criteria without running the program."""
        if kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = self.tokenizer
        meta = self.program.metadata
        return plan(
            default_generation_config=default_generation_config,
            max_position_embeddings=self.max_position_embeddings,
            context=meta.max_context_len,
            vocab_size=meta.vocab_size,
            input_ids=input_ids,
            **kwargs,
        )

    def generate(
        self, default_generation_config, input_ids, streamer=None, *, cached_prefix: int = 0, **kwargs: Any
    ) -> tuple[torch.LongTensor, GenerationStats]:
        """Generate continuations of ``input_ids``; see ``ETModelForCausalLM.generate``.

        Args:
            cached_prefix: how many leading tokens of ``input_ids`` (one unpadded row) the program's
                KV cache already holds at positions ``0 .. cached_prefix-1``, as the previous call
                left them (a chat session's history). Only the rest is prefilled; everything else
                (processors, criteria, the returned ids) sees the whole of ``input_ids``, so the
                result is the one a full prefill gives. The caller vouches for the cache contents.
        """
        t_start = time.perf_counter()
        plan_ = self.prepare(default_generation_config, input_ids, **kwargs)
        batch = plan_.input_ids.shape[0]
        if streamer is not None and batch > 1:
            raise ValueError(f"streaming supports one prompt at a time; got a batch of {batch}.")
        if cached_prefix and (batch > 1 or not bool(plan_.attention_mask.all())):
            raise ValueError("cached_prefix needs a single prompt without padding.")
        if not 0 <= cached_prefix < plan_.input_ids.shape[-1]:
            raise ValueError(
                f"cached_prefix={cached_prefix} must leave at least one of the prompt's "
                f"{plan_.input_ids.shape[-1]} tokens to prefill."
            )
        stats = GenerationStats()
        if streamer is not None:
            streamer.put(plan_.input_ids.cpu())
        rows = [self._generate_row(plan_, b, streamer, stats, t_start, cached_prefix) for b in range(batch)]
        if streamer is not None:
            streamer.end()

        out = torch.full((batch, max(r.shape[-1] for r in rows)), plan_.pad_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            out[b, : row.shape[-1]] = row[0]
        stats.total_time = time.perf_counter() - t_start
        stats.prefill_tokens_per_s = stats.prompt_tokens / stats.prefill_time if stats.prefill_time else None
        decoded = stats.generated_tokens - batch
        stats.decode_tokens_per_s = decoded / stats.decode_time if stats.decode_time and decoded > 0 else None
        stats.peak_rss_bytes = peak_rss_bytes()
        return out, stats

    def _generate_row(
        self, plan_: GenerationPlan, b: int, streamer, stats, t_start, cached_prefix: int = 0
    ) -> torch.Tensor:
        gc, criteria = plan_.generation_config, plan_.stopping_criteria
        processors = plan_.logits_processors[b]
        simple_stop = _simple_stop(criteria)  # (max_length, eos ids) when the criteria are just those
        # Only transformers' own processors and criteria see the logits: none keeps them past the
        # step, so the decode loop may read them in place (see Program.decode's ``copy``).
        copy_logits = simple_stop is None or not all(_is_transformers_own(p) for p in processors)
        prompt = plan_.input_ids[b : b + 1]  # [1, L], left padding included (what transformers' row holds)
        tokens = prompt[0][plan_.attention_mask[b].bool()].unsqueeze(0)  # [1, n]
        context = self.program.metadata.max_context_len
        rebuild_at = self.program.metadata.cache_rebuild_len
        # The row's ids live in one buffer; processors and criteria see a view of its filled part.
        ids_buffer = torch.empty(1, max(gc.max_length, prompt.shape[-1]) + 1, dtype=torch.long)
        ids_buffer[:, : prompt.shape[-1]] = prompt
        length = prompt.shape[-1]
        if rebuild_at is not None and cached_prefix <= rebuild_at < tokens.shape[-1]:
            cached_prefix = 0  # the cached keys used the short rope factors; this call needs the long ones
        t0 = time.perf_counter()
        logits = self.prefill(tokens[:, cached_prefix:], cached_prefix)  # [1, V]
        stats.prefill_time += time.perf_counter() - t0
        stats.prompt_tokens += tokens.shape[-1] - cached_prefix
        pos = tokens.shape[-1]
        t_first = None
        while True:
            ids = ids_buffer[:, :length]
            scores = processors(ids, logits) if processors else logits
            if gc.do_sample:
                token = int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1))
            else:
                token = int(np.argmax(scores.float().numpy()))  # single-threaded: cheaper than torch's here
            ids_buffer[0, length] = token
            length += 1
            stats.generated_tokens += 1
            if t_first is None:
                t_first = time.perf_counter()
                if stats.time_to_first_token is None:
                    stats.time_to_first_token = t_first - t_start
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if simple_stop is not None:
                if length >= simple_stop[0] or token in simple_stop[1]:
                    break
            elif bool(criteria(ids_buffer[:, :length], scores).all()):
                break
            if pos >= context:
                warnings.warn(
                    f"generation stopped at the end of the program's context ({context} tokens).",
                    UserWarning,
                    stacklevel=4,
                )
                break
            if pos == rebuild_at:
                # This call takes the sequence past the program's cache_rebuild_len: like
                # transformers' generate(), run the whole sequence again (see runtime.ProgramMetadata).
                logits = self.prefill(torch.cat([tokens, ids_buffer[:, prompt.shape[-1] : length]], dim=1))
            else:
                logits = self.program.decode(token, pos, copy=copy_logits)
            pos += 1
        stats.decode_time += time.perf_counter() - t_first
        return ids_buffer[:, :length]

    def prefill(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Run ``tokens`` (``[1, n]``) through the program from ``start_pos``; return last logits."""
        step = self.program.metadata.max_seq_len
        logits = None
        for s in range(0, tokens.shape[-1], step):
            logits = self.program.forward(tokens[:, s : s + step], start_pos + s)
        return logits
