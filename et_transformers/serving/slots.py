"""Slots, the prompt cache across requests, the wait queue, and generation on worker threads.

A :class:`Slot` is one loaded program (its own ``ETModelForCausalLM`` and KV cache) with the
:class:`~et_transformers.prompt_cache.PromptCache` that knows what its cache holds. The
:class:`SlotPool` gives a request the free slot whose cached tokens share the longest prefix with
its prompt, so a chat that re-sends its history prefills only the new turn; when every slot is
busy the request waits in a FIFO queue of at most ``max_queue`` requests, and past that
:class:`QueueFull` (429) is raised at once. A :class:`Job` runs one generation on a worker thread
(model calls block; the event loop stays free) and posts each token record to the loop; cancelling
it (a client that disconnected) stops the generation after the token in progress, and the slot is
given back when the worker's thread is done with it, never earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..generation import GenerationStats
from ..prompt_cache import PromptCache

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every slot is busy and the wait queue holds ``max_queue`` requests already.

    Attributes:
        retry_after: seconds after which a retry may find room (an estimate).
    """

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Slot:
    """One loaded program and what its KV cache holds.

    Attributes:
        index: position in the pool.
        model: the slot's own ``ETModelForCausalLM``.
        cache: the slot's :class:`~et_transformers.prompt_cache.PromptCache`.
        busy: a request holds the slot.
        last_used: when a request last got the slot (a counter, for least-recently-used choice).
    """

    index: int
    model: Any
    cache: PromptCache
    busy: bool = False
    last_used: int = 0


class SlotPool:
    """Hands slots to requests: the best prefix match among the free ones, else a bounded FIFO wait.

    Only the event loop's thread calls its methods (a job gives its slot back through the loop).

    Args:
        models: one ``ETModelForCausalLM`` per slot (see ``ETModelForCausalLM.replica``).
        max_queue: most requests waiting for a slot; one more gets :class:`QueueFull`.
    """

    def __init__(self, models: list, max_queue: int):
        if not models:
            raise ValueError("a slot pool needs at least one model.")
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0.")
        self.slots = [Slot(i, m, PromptCache(m)) for i, m in enumerate(models)]
        self.max_queue = max_queue
        self._waiting: deque[asyncio.Future] = deque()
        self._durations: deque[float] = deque(maxlen=32)  # recent request times, for Retry-After
        self.jobs: set[Job] = set()  # running on a worker thread
        self._uses = 0  # slots handed out so far
        self.executor = ThreadPoolExecutor(max_workers=len(models), thread_name_prefix="et-slot")

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return sum(not f.done() for f in self._waiting)

    @property
    def busy(self) -> int:
        """Slots a request holds."""
        return sum(s.busy for s in self.slots)

    def best_slot(self, ids: list[int]) -> Slot | None:
        """The free slot whose cache shares the longest prefix with ``ids`` (among equals, the least
        recently used: its cached conversation is the least likely to come back), or None when
        every slot is busy."""
        free = [s for s in self.slots if not s.busy]
        return max(free, key=lambda s: (s.cache.matched(ids), -s.last_used), default=None)

    def _take(self, slot: Slot) -> Slot:
        self._uses += 1
        slot.busy, slot.last_used = True, self._uses
        return slot

    def retry_after(self) -> int:
        """Seconds until a queued request would likely start (at least 1)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, round(mean * (self.queued + 1) / len(self.slots)))

    async def acquire(self, ids: list[int]) -> Slot:
        """A slot for a request whose prompt is ``ids``; waits in the queue while none is free.

        Raises:
            QueueFull: every slot is busy and ``max_queue`` requests wait already.
        """
        slot = self.best_slot(ids) if not self.queued else None
        if slot is not None:
            return self._take(slot)
        if self.queued >= self.max_queue:
            raise QueueFull(
                f"all {len(self.slots)} slots are busy and {self.queued} requests are waiting (--max-queue "
                f"{self.max_queue}): retry later, or start the server with more --slots or a longer --max-queue.",
                self.retry_after(),
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed a slot just as the request was cancelled
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)

    def release(self, slot: Slot, duration: float | None = None) -> None:
        """Give ``slot`` back: to the first waiting request, else to the free slots."""
        if duration is not None:
            self._durations.append(duration)
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(self._take(slot))  # stays busy: it changes hands
                return
        slot.busy = False

    def close(self) -> None:
        """Stop the running generations (after their token in progress) and the worker threads."""
        for job in list(self.jobs):
            job.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)


_END = object()


@dataclass(eq=False)
class Job:
    """One request's generation on a slot, run on a worker thread.

    Attributes:
        slot: the slot it runs on (given back when the worker is done).
        ids: the prompt's token ids.
        options: ``PromptCache.stream`` keywords.
        arrived: ``time.perf_counter()`` when the request arrived.
        label: names the request in logs (e.g. its id and OpenAI's ``user``).
        events: the records, then the error if one was raised, then an end marker (read them
            with :meth:`records`).
        cancelled: set to stop the generation after the token in progress.
        stats: the generation's stats, once it ended.
        new_tokens: the ids it produced, once it ended.
        cached_tokens: prompt tokens reused from the slot's cache, once it ended.
        first_token_at: ``time.perf_counter()`` when the first token was produced.
    """

    slot: Slot
    ids: list[int]
    options: dict
    arrived: float = field(default_factory=time.perf_counter)
    label: str = ""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats | None = None
    new_tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    first_token_at: float | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from the request's arrival to its first token (None before it)."""
        return None if self.first_token_at is None else self.first_token_at - self.arrived

    def start(self, pool: SlotPool, on_done: Callable[[Job], None] | None = None) -> None:
        """Run on a worker thread of ``pool``. When the run is done (on the event loop's thread) the
        slot goes back to the pool, then ``on_done(job)`` is called."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        pool.jobs.add(self)

        def done(_) -> None:
            pool.jobs.discard(self)
            pool.release(self.slot, time.perf_counter() - t0)
            if on_done is not None:
                on_done(self)

        loop.run_in_executor(pool.executor, self._run, loop).add_done_callback(done)

    def cancel(self) -> None:
        """Stop the generation after the token in progress (the client left)."""
        self.cancelled.set()

    def _post(self, loop: asyncio.AbstractEventLoop, item) -> None:
        try:
            loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody is reading
            self.cancelled.set()

    def _finished(self, stats: GenerationStats, new: list[int], cached: int) -> None:
        self.stats, self.new_tokens, self.cached_tokens = stats, new, cached

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            records = self.slot.cache.stream(self.ids, on_finish=self._finished, **self.options)
            with contextlib.closing(records):  # closing frees the program at once, not when collected
                for record in records:
                    if self.first_token_at is None:
                        self.first_token_at = time.perf_counter()
                    self._post(loop, record)
                    if self.cancelled.is_set():
                        logger.info("slot %d: %s: client gone, generation stopped after %d tokens",
                                    self.slot.index, self.label, record.generation_tokens)
                        break
        except Exception as e:  # handed to the request's coroutine, which answers with it
            self._post(loop, e)
        finally:
            self._post(loop, _END)

    async def records(self):
        """The generation's records as they come; raises the generation's error, if any."""
        while True:
            item = await self.events.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item


def load_slots(model, slots: int) -> list:
    """``slots`` model objects for a pool: ``model`` itself and ``slots - 1`` replicas of its program
    (``ETModelForCausalLM.replica``: the ``.pte`` is memory-mapped, each replica has its own KV cache).

    Raises:
        ValueError: ``slots`` < 1.
    """
    if slots < 1:
        raise ValueError(f"--slots {slots}: a server needs at least one slot.")
    models = [model]
    for i in range(1, slots):
        models.append(model.replica())
        logger.info("slot %d loaded from %s", i, model.pte_path)
    return models
