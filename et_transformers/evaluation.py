"""Teacher-forced evaluation: perplexity and next-token predictions of an exported program or an
eager model on a token sequence, and top-1 agreement between two such runs.

The text is cut into non-overlapping windows that each start from an empty context. A generation
program (``logits="last"``) is driven one token per call, exactly as ``generate()`` decodes, so the
figures describe the shipped file; an evaluation program (``logits="all"``) takes a window per call.
Used by ``benchmarks/quality.py`` and the real-model quality tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Evaluation:
    """Result of a teacher-forced run.

    Attributes:
        predictions: the argmax next-token prediction at every scored position, concatenated.
        nll: summed negative log-likelihood of the actual next tokens (natural log).
        tokens: how many positions were scored.
    """

    predictions: torch.Tensor
    nll: float
    tokens: int

    @property
    def perplexity(self) -> float:
        """``exp(mean negative log-likelihood)``."""
        return math.exp(self.nll / self.tokens)

    def agreement(self, other: "Evaluation") -> float:
        """Fraction of positions where this run's top-1 prediction equals ``other``'s."""
        if other.predictions.shape != self.predictions.shape:
            raise ValueError(
                f"the runs scored different positions ({self.tokens} vs {other.tokens}); evaluate the "
                f"same tokens with the same window."
            )
        return float((self.predictions == other.predictions).float().mean())


def windows(input_ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split ``input_ids`` (``[1, N]``) into windows of ``size`` tokens (the last may be shorter)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"expected input_ids of shape [1, N]; got {list(input_ids.shape)}.")
    if size < 2:
        raise ValueError(f"window={size} is too small: a window needs at least 2 tokens to score one.")
    n = input_ids.shape[1]
    return [input_ids[:, s : s + size] for s in range(0, n, size) if min(size, n - s) >= 2]


def _evaluate(input_ids: torch.Tensor, window: int, logits_of) -> Evaluation:
    """Score every window: ``logits_of(chunk[:, :-1])`` gives the logits ``[n-1, vocab]`` that
    predict ``chunk[0, 1:]``."""
    predictions, nll = [], 0.0
    for chunk in windows(input_ids, window):
        logits = logits_of(chunk[:, :-1]).float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        predictions.append(logits.argmax(-1))
    preds = torch.cat(predictions)
    return Evaluation(preds, nll, preds.numel())


def evaluate_program(program, input_ids: torch.Tensor, window: int) -> Evaluation:
    """Teacher-force ``input_ids`` through an exported :class:`~et_transformers.runtime.Program`
    (its ``forward_all``: one call per window on an evaluation program, one per token otherwise),
    holding the program's lock.

    Raises:
        ValueError: ``window`` exceeds the program's context.
    """
    if window > program.metadata.max_context_len:
        raise ValueError(
            f"window={window} exceeds the program's context of {program.metadata.max_context_len} tokens; "
            f"use a smaller window or export with a larger max_seq_len."
        )
    with program.lock:  # every window overwrites the KV cache from position 0
        return _evaluate(input_ids, window, lambda ids: program.forward_all(ids, 0)[0])


def evaluate_eager(model, input_ids: torch.Tensor, window: int) -> Evaluation:
    """Teacher-force ``input_ids`` through an eager transformers causal LM (same windows)."""
    with torch.no_grad():
        return _evaluate(input_ids, window, lambda ids: model(ids).logits[0])
