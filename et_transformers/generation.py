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
from dataclasses import asdict, dataclass, field
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from transformers.generation import stopping_criteria as sc

from .assisted import make_proposer, speculative_choice
from .planning import GenerationPlan, _special_tokens, plan
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
        weight_bytes_per_token: bytes of weights one decode step reads, from the program's manifest
            (``None`` without one).
        decode_bandwidth_gb_s: achieved weight bandwidth of decoding,
            ``weight_bytes_per_token * decode_tokens_per_s / 1e9`` (as gpt-fast reports it; with
            assisted generation, the rate tokens appear at, which may exceed what one token per
            weight read allows).
        drafted_tokens: tokens proposed by assisted generation (prompt lookup or a draft model).
        accepted_tokens: drafted tokens the target model chose itself (each saved one decode step).
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
    weight_bytes_per_token: int | None = None
    decode_bandwidth_gb_s: float | None = None
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float | None:
        """``accepted_tokens / drafted_tokens``, or None when nothing was drafted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

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
        if self.decode_bandwidth_gb_s:
            parts.append(f"weights {self.decode_bandwidth_gb_s:.2f} GB/s")
        if self.drafted_tokens:
            parts.append(
                f"drafted {self.drafted_tokens}, accepted {self.accepted_tokens} ({self.acceptance_rate:.0%})"
            )
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


def _choose(scores: torch.Tensor, do_sample: bool, rng: torch.Generator | None = None) -> int:
    """The next token from ``scores`` ``[1, V]``: sampled (from ``rng``, else torch's global RNG), or the argmax."""
    if do_sample:
        return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=rng))
    return int(np.argmax(scores.float().numpy()))  # single-threaded: cheaper than torch's here


def _is_transformers_own(obj) -> bool:
    """True for an instance of a class defined in transformers itself (not a user's subclass)."""
    return type(obj).__module__.startswith("transformers.")


#: Finish reasons (:attr:`~et_transformers.streaming.GenerationResponse.finish_reason`), and which
#: wins when several criteria stop the same step.
FINISH_REASONS = ("eos", "stop_string", "grammar", "length", "max_time", "criteria", "context")


def _reason(criterion) -> str:
    """The finish reason a transformers stopping criterion stands for (a criterion of ours may name
    its own, e.g. the grammar's completion)."""
    own = getattr(criterion, "finish_reason", None)
    if own in FINISH_REASONS:
        return own
    if isinstance(criterion, sc.EosTokenCriteria):
        return "eos"
    if isinstance(criterion, sc.StopStringCriteria):
        return "stop_string"
    if isinstance(criterion, sc.MaxLengthCriteria):
        return "length"
    if isinstance(criterion, sc.MaxTimeCriteria):
        return "max_time"
    return "criteria"


def _check_criteria(criteria, ids: torch.Tensor, scores: torch.Tensor) -> str | None:
    """Run every criterion once, as ``StoppingCriteriaList`` does; the finish reason, or None."""
    fired = [_reason(c) for c in criteria if bool(c(ids, scores).all())]
    return min(fired, key=FINISH_REASONS.index) if fired else None


#: One step of the loop: ``(token, scores [1, V], logits [1, V], finish reason or None)``. The
#: tensors may be the program's own output memory, valid only until the loop resumes: keep a clone.
Step = tuple[int, torch.Tensor, torch.Tensor, "str | None"]


class Generator:
    """Runs generation for one program: the decode loop that ``generate()``, streamers,
    ``stream_generate()`` and chat sessions all consume.

    Args:
        program: the loaded :class:`~et_transformers.runtime.Program`.
        max_position_embeddings: from the model config, if known (caps a default ``max_length``).
        tokenizer: the model's tokenizer (used for ``stop_strings`` when none is passed).
        weight_bytes_per_token: bytes of weights a decode step reads, if known (for the stats).
    """

    def __init__(
        self,
        program: Program,
        max_position_embeddings: int | None = None,
        tokenizer=None,
        weight_bytes_per_token: int | None = None,
    ):
        self.program = program
        self.max_position_embeddings = max_position_embeddings
        self.tokenizer = tokenizer
        self.weight_bytes_per_token = weight_bytes_per_token

    def prepare(self, default_generation_config, input_ids, *, image_features=None, **kwargs: Any) -> GenerationPlan:
        """Validate a call and build its processors/criteria without running the program.

        ``image_features`` (image-text-to-text programs): ``(positions [n], features [n, hidden])``, the
        embeddings that replace the prompt's image tokens (positions in its unpadded row).
        """
        if kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = self.tokenizer
        meta = self.program.metadata
        plan_ = plan(
            default_generation_config=default_generation_config,
            max_position_embeddings=self.max_position_embeddings,
            context=meta.max_context_len,
            vocab_size=meta.vocab_size,
            input_ids=input_ids,
            **kwargs,
        )
        if image_features is not None and plan_.input_ids.shape[0] != 1:
            raise ValueError(
                f"images go with one prompt at a time, and input_ids holds {plan_.input_ids.shape[0]}: "
                f"generate each image prompt in its own call (or load replicas to run them in parallel)."
            )
        plan_.image_features = image_features
        return plan_

    def check_cached_prefix(self, plan_: GenerationPlan, cached_prefix: int) -> None:
        """Raise ``ValueError`` unless ``cached_prefix`` leaves a single unpadded prompt to prefill."""
        if cached_prefix and (plan_.input_ids.shape[0] > 1 or not bool(plan_.attention_mask.all())):
            raise ValueError("cached_prefix needs a single prompt without padding.")
        if not 0 <= cached_prefix < plan_.input_ids.shape[-1]:
            raise ValueError(
                f"cached_prefix={cached_prefix} must leave at least one of the prompt's "
                f"{plan_.input_ids.shape[-1]} tokens to prefill."
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

        The call holds the program's lock (:class:`~et_transformers.runtime.ProgramLock`): calls
        from several threads run one after another.
        """
        with self.program.lock:  # the KV cache holds one sequence: one call at a time
            return self._generate(default_generation_config, input_ids, streamer, cached_prefix, **kwargs)

    def _generate(self, default_generation_config, input_ids, streamer, cached_prefix: int, **kwargs: Any):
        t_start = time.perf_counter()
        plan_ = self.prepare(default_generation_config, input_ids, **kwargs)
        batch = plan_.input_ids.shape[0]
        if streamer is not None and batch > 1:
            raise ValueError(f"streaming supports one prompt at a time; got a batch of {batch}.")
        self.check_cached_prefix(plan_, cached_prefix)
        gc = plan_.generation_config
        keep_scores = bool(gc.return_dict_in_generate and gc.output_scores)
        keep_logits = bool(gc.return_dict_in_generate and gc.output_logits)
        stats = GenerationStats()
        if streamer is not None:
            streamer.put(plan_.input_ids.cpu())
        rows, scores, logits = [], [], []  # per row: new tokens; [1, V] per step when kept
        for b in range(batch):
            tokens, row_scores, row_logits = [], [], []
            for token, step_scores, step_logits, _ in self.steps(plan_, b, stats, t_start, cached_prefix):
                tokens.append(token)
                if keep_scores:
                    row_scores.append(step_scores.clone())  # the loop may reuse the program's memory
                if keep_logits:
                    row_logits.append(step_logits.clone())
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
            rows.append(tokens)
            scores.append(row_scores)
            logits.append(row_logits)
        if streamer is not None:
            streamer.end()

        prompt_len = plan_.input_ids.shape[-1]
        steps = max(map(len, rows))
        out = torch.full((batch, prompt_len + steps), plan_.pad_token_id, dtype=torch.long)
        out[:, :prompt_len] = plan_.input_ids
        for b, tokens in enumerate(rows):
            out[b, prompt_len : prompt_len + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        stats = self.finish_stats(stats, t_start, batch)
        # transformers' _sample pads a stopped row only when an EOS criterion is present; otherwise
        # the row goes on choosing tokens until the batch stops.
        pad_stopped = any(hasattr(c, "eos_token_id") for c in plan_.stopping_criteria)
        for b, tokens in enumerate(rows):
            if len(tokens) < steps and (keep_scores or keep_logits or not pad_stopped):
                kept = (scores[b] if keep_scores else None), (logits[b] if keep_logits else None)
                self._after_stop(plan_, b, out[b : b + 1], len(tokens), *kept, pad=pad_stopped)
        if not gc.return_dict_in_generate:
            return out, stats
        return _decoder_only_output(out, scores if keep_scores else None, logits if keep_logits else None), stats

    def _after_stop(self, plan_: GenerationPlan, b: int, row: torch.Tensor, new: int, scores, logits, *, pad: bool):
        """Run row ``b`` on from its stop at ``new`` tokens to the batch's length, as transformers does.

        transformers keeps running a stopped row until the whole batch stops: with
        ``pad_token_id`` fed back (and attended to) when ``pad``, else with the tokens the row goes
        on choosing (written into ``row``). This runs the row's sequence again and does the same,
        appending each step's scores and logits to ``scores``/``logits`` (unless None), outside
        the generation's stats.
        """
        prompt_len = plan_.input_ids.shape[-1]
        processors = plan_.logits_processors[b]
        seq = row[:, prompt_len - int(plan_.attention_mask[b].sum()) :]  # [1, n + steps], unpadded
        pos = seq.shape[-1] - (row.shape[-1] - prompt_len - new)  # where the first token after the stop goes
        step_logits = self.prefill(seq[:, :pos])
        for length in range(prompt_len + new, row.shape[-1]):
            step_scores = processors(row[:, :length], step_logits) if processors else step_logits
            if scores is not None:
                scores.append(step_scores.clone())
            if logits is not None:
                logits.append(step_logits.clone())
            token = plan_.pad_token_id if pad else _choose(step_scores, plan_.generation_config.do_sample, plan_.rng)
            row[0, length] = token
            if length + 1 < row.shape[-1]:
                step_logits = self.program.decode(token, pos)
                pos += 1

    def steps(
        self, plan_: GenerationPlan, b: int, stats: GenerationStats, t_start: float, cached_prefix: int = 0
    ) -> Iterator[Step]:
        """The decode loop for row ``b`` of ``plan_``: prefill, then one :data:`Step` per new token.

        The last step carries the finish reason. ``stats`` is updated as the loop runs (its
        ``decode_time`` when the loop ends or is closed).

        With assisted generation (``prompt_lookup_num_tokens`` or ``assistant_model``), the logits
        after a token may come from the call that verified a draft: each drafted token the target
        chooses itself (greedy or sampled, through the same processors) saves a decode step, and
        the first one it does not choose ends the draft. Steps, processors, criteria and
        streamers see exactly what they would see without assistance.

        Raises:
            RuntimeError: something else ran the program while the loop was paused between steps
                (its KV cache then holds other tokens).
        """
        gc, criteria = plan_.generation_config, plan_.stopping_criteria
        processors, do_sample = plan_.logits_processors[b], gc.do_sample
        simple_stop = _simple_stop(criteria)  # (max_length, eos ids) when the criteria are just those
        # Only transformers' own processors and criteria see the logits: none keeps them past the
        # step, so the decode loop may read them in place (see Program.decode's ``copy``).
        copy_logits = simple_stop is None or not all(_is_transformers_own(p) for p in processors)
        program = self.program
        eos = _special_tokens(gc)[0]
        proposer = make_proposer(
            gc, program, plan_.assistant, processors, [] if eos is None else eos.tolist(), plan_.input_ids.shape[0]
        )
        verify_width = program.metadata.verify_tokens
        # (drafted token, logits after it, the draft's distribution it was sampled from or None)
        drafted: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        last_draft = 0  # size of the draft being consumed (for the proposer's schedule)
        prompt = plan_.input_ids[b : b + 1]  # [1, L], left padding included (what transformers' row holds)
        tokens = prompt[0][plan_.attention_mask[b].bool()].unsqueeze(0)  # [1, n]
        context = program.metadata.max_context_len
        rebuild_at = program.metadata.cache_rebuild_len
        # The row's ids live in one buffer; processors and criteria see a view of its filled part.
        ids_buffer = torch.empty(1, max(gc.max_length, prompt.shape[-1]) + 1, dtype=torch.long)
        ids_buffer[:, : prompt.shape[-1]] = prompt
        length = prompt.shape[-1]
        if rebuild_at is not None and cached_prefix <= rebuild_at < tokens.shape[-1]:
            cached_prefix = 0  # the cached keys used the short rope factors; this call needs the long ones
        t0 = time.perf_counter()
        logits = self.prefill(tokens[:, cached_prefix:], cached_prefix, plan_.image_features)  # [1, V]
        stats.prefill_time += time.perf_counter() - t0
        stats.prompt_tokens += tokens.shape[-1] - cached_prefix
        pos = tokens.shape[-1]
        t_first = None
        try:
            while True:
                ids = ids_buffer[:, :length]
                scores = processors(ids, logits) if processors else logits
                if drafted and drafted[0][2] is not None:  # a sampled draft token: its q is known
                    token = speculative_choice(scores, drafted[0][0], drafted[0][2])
                else:
                    token = _choose(scores, do_sample, plan_.rng)
                ids_buffer[0, length] = token
                length += 1
                stats.generated_tokens += 1
                accepted = bool(drafted) and drafted[0][0] == token  # the target chose the drafted token
                stats.accepted_tokens += accepted
                if t_first is None:
                    t_first = time.perf_counter()
                    if stats.time_to_first_token is None:
                        stats.time_to_first_token = t_first - t_start
                if simple_stop is not None:
                    finish = "eos" if token in simple_stop[1] else "length" if length >= simple_stop[0] else None
                else:
                    finish = _check_criteria(criteria, ids_buffer[:, :length], scores)
                if (finish is None and pos >= context) or (finish == "length" and pos + 1 >= context):
                    finish = "context"  # the sequence fills the program's context (max_length was cut to it)
                executions = program.executions
                yield token, scores, logits, finish
                if finish is not None:
                    return
                if program.executions != executions:
                    raise RuntimeError(
                        "the program ran other work between two tokens of this generation (a call from "
                        "the same thread: the code consuming a paused stream, or a logits processor or "
                        "stopping criterion running the model), so its KV cache no longer holds this "
                        "sequence. Finish or close a stream before running the model again."
                    )
                if accepted:
                    logits = drafted.pop(0)[1]  # the verify call already ran this token at pos
                    pos += 1
                    continue
                if proposer is not None and last_draft:
                    proposer.feedback(last_draft, last_draft - len(drafted))
                drafted, last_draft = [], 0
                draft = []
                if proposer is not None:
                    limit = min(verify_width - 1, context - pos - 1, gc.max_length - length)
                    if rebuild_at is not None and pos <= rebuild_at:
                        limit = min(limit, rebuild_at - pos - 1)  # never verify across the rebuild
                    draft = proposer.propose(ids_buffer[0, :length].tolist(), limit) if limit > 0 else []
                if draft:
                    rows = program.verify([token, *draft], pos)  # [1 + n, V]: after token, after each draft
                    stats.drafted_tokens += len(draft)
                    logits = rows[:1]
                    q = getattr(proposer, "probabilities", None) or [None] * len(draft)
                    drafted = [(d, rows[i + 1 : i + 2], q[i]) for i, d in enumerate(draft)]
                    last_draft = len(draft)
                elif pos == rebuild_at:
                    # This call takes the sequence past the program's cache_rebuild_len: like
                    # transformers' generate(), run the whole sequence again (see runtime.ProgramMetadata).
                    logits = self.prefill(torch.cat([tokens, ids_buffer[:, prompt.shape[-1] : length]], dim=1),
                                          0, plan_.image_features)
                else:
                    logits = program.decode(token, pos, copy=copy_logits)
                pos += 1
        finally:
            if t_first is not None:
                stats.decode_time += time.perf_counter() - t_first

    def finish_stats(self, stats: GenerationStats, t_start: float, rows: int) -> GenerationStats:
        """Fill the derived figures of ``stats`` (rates, bandwidth, total time, peak RSS) for ``rows``
        rows; return it."""
        stats.total_time = time.perf_counter() - t_start
        stats.prefill_tokens_per_s = stats.prompt_tokens / stats.prefill_time if stats.prefill_time else None
        decoded = stats.generated_tokens - rows
        stats.decode_tokens_per_s = decoded / stats.decode_time if stats.decode_time and decoded > 0 else None
        stats.weight_bytes_per_token = self.weight_bytes_per_token
        if self.weight_bytes_per_token is not None and stats.decode_tokens_per_s is not None:
            stats.decode_bandwidth_gb_s = self.weight_bytes_per_token * stats.decode_tokens_per_s / 1e9
        stats.peak_rss_bytes = peak_rss_bytes()
        return stats

    def prefill(self, tokens: torch.Tensor, start_pos: int = 0, image_features=None) -> torch.Tensor:
        """Run ``tokens`` (``[1, n]``) through the program from ``start_pos``; return last logits."""
        return prefill(self.program, tokens, start_pos, image_features)


def prefill(program: Program, tokens: torch.Tensor, start_pos: int = 0, image_features=None) -> torch.Tensor:
    """Run ``tokens`` (``[1, n]``) through ``program`` from ``start_pos``, in calls of at most its
    ``max_seq_len`` tokens; return the last position's logits ``[1, V]``.

    ``image_features``: ``(positions, features)`` replacing those positions' embeddings (see
    :meth:`~et_transformers.runtime.Program.forward`).
    """
    step = program.metadata.max_seq_len
    logits = None
    for s in range(0, tokens.shape[-1], step):
        if image_features is None:
            logits = program.forward(tokens[:, s : s + step], start_pos + s)
        else:
            logits = program.forward(tokens[:, s : s + step], start_pos + s, image_features=image_features)
    return logits


def _decoder_only_output(sequences, scores, logits):
    """transformers' ``GenerateDecoderOnlyOutput``; ``scores``/``logits``: per row, ``[1, V]`` per step."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput  # imports GenerationMixin: only here

    def per_step(rows):
        return None if rows is None else tuple(torch.cat(step, dim=0) for step in zip(*rows))  # [B, V] each

    return GenerateDecoderOnlyOutput(sequences=sequences, scores=per_step(scores), logits=per_step(logits))
