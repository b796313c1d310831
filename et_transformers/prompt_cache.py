"""Prompt caching: which tokens a model's KV cache holds, so the next generation prefills only the rest.

A program's KV cache keeps, after a generation, the keys and values of every token that went
through it (the prompt and all new tokens but the last, which was sampled and never fed back).
:class:`PromptCache` remembers that sequence for one model object; a later prompt that starts with
the same tokens (a chat that re-sends its history, a server request that shares a system prompt)
is prefilled from the first position where they differ, and everything else (processors, criteria,
the result) sees the whole prompt, so the output is the one a full prefill gives. It notices when
anything else ran the program since (the program's execution counter moved: the cache then holds
other tokens) and reuses nothing. :class:`~et_transformers.chat.ChatSession` keeps one per
conversation; the server keeps one per slot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .generation import GenerationStats
from .streaming import GenerationResponse, stream

logger = logging.getLogger(__name__)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


#: Called when a cached generation ends: ``(stats, new token ids, tokens reused from the cache)``.
OnFinish = Callable[[GenerationStats, list[int], int], None]


class PromptCache:
    """The tokens a model's KV cache holds, and generation that reuses them.

    Args:
        model: an :class:`~et_transformers.ETModelForCausalLM`; every generation through this
            object runs on it, holding its program's lock.

    Attributes:
        tokens: the tokens at KV-cache positions ``0 .. len-1`` after the last generation through
            this object (empty when nothing is known).
    """

    def __init__(self, model):
        self.model = model
        self.tokens: list[int] = []
        #: ``(positions, features)`` of the images among :attr:`tokens` (image-text-to-text models)
        self.image_features: tuple[torch.Tensor, torch.Tensor] | None = None
        self._executions = -1  # program.executions right after our last generation

    def clear(self) -> None:
        """Forget what the cache holds: the next generation prefills its whole prompt."""
        self.tokens, self.image_features, self._executions = [], None, -1

    def matched(self, ids: list[int], image_features=None) -> int:
        """How many leading tokens of ``ids`` the KV cache holds now and a generation would reuse
        (at least one token is always prefilled: its logits choose the first new token).

        Image placeholder tokens are the same ids whatever the image: with ``image_features``
        (the prompt's ``(positions, features)``) the reuse also stops at the first image position
        whose features differ from those the cache was filled with.
        """
        if self.model.program.executions != self._executions or not ids:
            return 0
        n = min(common_prefix_length(self.tokens, ids), len(ids) - 1)
        return _first_image_difference(self.image_features, image_features, n)

    def _reusable(self, ids: list[int], image_features=None) -> int:
        if self.tokens and self.model.program.executions != self._executions:
            logger.info("The program ran other work since this cache's last generation: prefilling the whole prompt.")
        return self.matched(ids, image_features)

    def _record(self, ids: list[int], new: list[int], image_features=None) -> None:
        # The last sampled token was never fed to the program: the cache holds all but it.
        self.tokens = (ids + new)[:-1] if new else list(ids)
        self.image_features = image_features
        self._executions = self.model.program.executions

    def generate(self, ids: list[int], *, streamer=None, **kwargs: Any) -> tuple[list[int], int, GenerationStats]:
        """Generate from ``ids``, prefilling only what the cache does not hold.

        Args:
            ids: the prompt's token ids (one unpadded prompt).
            streamer: a transformers streamer.
            **kwargs: ``generate()`` options.

        Returns:
            ``(new token ids, tokens reused from the cache, stats)``.

        Raises:
            ValueError: invalid options, as ``generate()``.
        """
        model = self.model
        with model.program.lock:  # the cache check, the generation and the bookkeeping, as one
            cached = self._reusable(ids, kwargs.get("image_features"))
            out, stats = model._generator.generate(
                model.generation_config,
                torch.tensor([ids], dtype=torch.long),
                streamer=streamer,
                cached_prefix=cached,
                **kwargs,
            )
            sequences = out if isinstance(out, torch.Tensor) else out.sequences  # return_dict_in_generate
            new = sequences[0, len(ids):].tolist()
            self._record(ids, new, kwargs.get("image_features"))
            return new, cached, stats

    def stream(self, ids: list[int], *, on_finish: OnFinish | None = None, **kwargs: Any) -> Iterator[GenerationResponse]:
        """Like :meth:`generate`, but yield :class:`~et_transformers.streaming.GenerationResponse`
        records as tokens are produced (``ETModelForCausalLM.stream_generate``'s records).

        The model is held from the first iteration until the stream ends or is closed; a stream
        closed early leaves the cache holding the tokens so far (and records them), so the next
        prompt that continues them reuses them.

        Args:
            ids: the prompt's token ids.
            on_finish: called once when the stream ends or is closed.
            **kwargs: ``stream_generate()`` options (``logprobs``, ``top_logprobs``, ``generate()``
                options).

        Raises:
            ValueError: invalid options, raised by the first iteration (the reuse is decided
                then, while the stream holds the model).
        """
        model = self.model
        with model.program.lock:  # held for the whole stream, as in generate()
            cached = self._reusable(ids, kwargs.get("image_features"))
            finished: list[tuple[GenerationStats, list[int]]] = []
            records = stream(
                model._generator,
                model.generation_config,
                torch.tensor([ids], dtype=torch.long),
                cached_prefix=cached,
                on_finish=lambda stats, new: finished.append((stats, new)),
                **kwargs,
            )
            program = model.program
            last = failed = None
            try:
                for record in records:
                    last = program.executions  # what this stream has run so far
                    yield record
            except GeneratorExit:
                raise
            except BaseException:
                failed = True
                raise
            finally:
                records.close()
                if finished:
                    stats, new = finished[0]
                    self._record(ids, new, kwargs.get("image_features"))
                    if on_finish is not None:
                        on_finish(stats, new, cached)
                    if failed or program.executions != last:
                        # The stream broke off, or something else ran the program while it was
                        # paused: the cache no longer holds this sequence.
                        self.clear()


def _image_rows(image_features, n: int) -> dict[int, torch.Tensor]:
    if image_features is None:
        return {}
    positions, features = image_features
    return {int(p): features[i] for i, p in enumerate(positions.tolist()) if p < n}


def _first_image_difference(cached, new, n: int) -> int:
    """The first of positions ``0 .. n-1`` where the cached and the new image features differ
    (an image on one side only, or other features), else ``n``."""
    old_rows, new_rows = _image_rows(cached, n), _image_rows(new, n)
    for p in sorted(old_rows.keys() | new_rows.keys()):
        if p not in old_rows or p not in new_rows or not torch.equal(old_rows[p], new_rows[p]):
            return p
    return n
