"""Multi-turn chat over one program whose KV cache is kept between turns.

:class:`ChatSession` owns a conversation: the messages, and which tokens the program's KV cache
holds for them. Each :meth:`ChatSession.send` renders the whole conversation with the tokenizer's
chat template, as a stateless ``generate()`` on the full history would, then compares it with the
cached tokens and prefills only from the first position where they differ. Usually that is just
the new turn (the previous reply's end-of-turn tokens and the new user message), so the time to the
first token does not grow with the history; when the template renders the history differently
(a reply that re-tokenizes differently, a template that rewrites past turns) the differing tail is
re-read, never trusted. The result is token for token what ``generate()`` on the full history
gives. The session notices when anything else has run the program since its last turn (the cache
then holds other tokens) and re-reads the conversation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .errors import ContextFullError, ETTransformersError
from .generation import GenerationStats
from .prompt_cache import PromptCache, common_prefix_length
from .streaming import GenerationResponse

__all__ = ["ChatSession", "common_prefix_length"]

#: New tokens per reply when neither the call nor the model's generation config says.
DEFAULT_MAX_NEW_TOKENS = 256


class ChatSession:
    """A conversation with a model, reusing the KV cache across turns.

    Args:
        model: an :class:`~et_transformers.ETModelForCausalLM` whose tokenizer has a chat template.
        system_prompt: an optional system message that opens the conversation.
        **generation_kwargs: defaults for every turn (``max_new_tokens``, ``do_sample``,
            ``temperature``, ... as ``generate()`` takes them); :meth:`send` may override them.

    Attributes:
        messages: the conversation so far, as ``[{"role", "content"}]`` dicts.
        reply_ids: token ids of the last reply, as generated (end-of-turn token included).
        stats: :class:`~et_transformers.generation.GenerationStats` of the last turn; its ``extra``
            holds ``cached_tokens`` (reused from the cache), ``prefilled_tokens`` (read this turn),
            ``context_used`` and ``context_size``.

    Raises:
        TokenizerError: the model has no tokenizer.
        ETTransformersError: its tokenizer has no chat template.
    """

    def __init__(self, model, *, system_prompt: str | None = None, **generation_kwargs: Any):
        tokenizer = model.require_tokenizer("a chat")  # TokenizerError when the model has none
        if not getattr(tokenizer, "chat_template", None):
            raise ETTransformersError(
                f"{model.pte_path.parent} has no tokenizer chat template; a chat needs one "
                f"(use generate() for plain text prompts)."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.generation_kwargs = generation_kwargs
        self.messages: list[dict[str, Any]] = []
        #: the conversation's images, in the order its messages show them
        self.images: list[Any] = []
        self.reply_ids: list[int] = []
        self.stats = GenerationStats()
        #: the tokens the program's KV cache holds for this conversation (see :class:`PromptCache`)
        self.prompt_cache = PromptCache(model)
        self.reset()

    # -- state ------------------------------------------------------------------------------

    @property
    def context_size(self) -> int:
        """Positions in the program's KV cache: the most tokens a conversation can hold."""
        return self.model.program.metadata.max_context_len

    @property
    def context_used(self) -> int:
        """Tokens of the conversation held in the KV cache now."""
        return len(self.prompt_cache.tokens)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays); the next turn starts at position 0."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.images = []
        self.prompt_cache.clear()
        self.reply_ids = []
        self.stats = GenerationStats()

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the chat template, ready for the assistant's reply."""
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    # -- turns ------------------------------------------------------------------------------

    def render_with_images(self, messages: list[dict[str, Any]], images: list[Any]) -> tuple[list[int], dict]:
        """Token ids of ``messages`` (showing ``images`` in order) through the model's processor, and
        the processor's image tensors (``pixel_values``, ...) for them."""
        encoded = self.model.prepare_inputs(messages, images)
        return encoded.pop("input_ids")[0].tolist(), encoded

    def send(self, text: str, *, images=(), streamer=None, **generation_kwargs: Any) -> str:
        """Add a user message, generate the assistant's reply, and return its text.

        Args:
            text: the user's message.
            images: images shown with it (PIL images or paths), for an image-text-to-text model;
                they stay in the conversation, and later turns reuse their place in the KV cache.
            streamer: a transformers streamer (``TextStreamer(tok, skip_prompt=True)`` prints the
                reply as it is produced).
            **generation_kwargs: ``generate()`` options for this turn, over the session's defaults.
                ``max_new_tokens`` is shortened to what the context still holds.

        Returns:
            The reply, decoded without special tokens (also appended to :attr:`messages`).

        Raises:
            ContextFullError: the conversation plus the new message leaves no room for a reply;
                :meth:`reset` (or a new session) starts over.
            ValueError: invalid generation options.
        """
        messages, images, ids, options = self._prepare_turn(text, images, generation_kwargs)
        new, cached, stats = self.prompt_cache.generate(ids, streamer=streamer, **options)
        return self._finish_turn(messages, images, ids, new, cached, stats)

    def stream(self, text: str, *, images=(), **generation_kwargs: Any) -> Iterator[GenerationResponse]:
        """Like :meth:`send`, but yield the reply token by token as it is produced.

        The tokens are those :meth:`send` gives; the records are
        ``ETModelForCausalLM.stream_generate``'s. The turn (messages, cache bookkeeping, stats) is
        recorded when the stream ends; a stream closed early records the reply so far.

        Args:
            text: the user's message.
            images: as for :meth:`send`.
            **generation_kwargs: as for :meth:`send`, plus ``logprobs`` and ``top_logprobs``.

        Returns:
            An iterator of :class:`~et_transformers.streaming.GenerationResponse`.

        Raises:
            ContextFullError: as :meth:`send`, raised by this call.
            ValueError: invalid generation options, raised by the first iteration (the turn's
                cache reuse is decided then, while the stream holds the model).
        """
        messages, images, ids, options = self._prepare_turn(text, images, generation_kwargs)
        return self.prompt_cache.stream(
            ids, on_finish=lambda stats, new, cached: self._finish_turn(messages, images, ids, new, cached, stats),
            **options,
        )

    def _prepare_turn(self, text: str, images, generation_kwargs: dict[str, Any]):
        """``(messages with the new one, the conversation's images, their token ids, this turn's
        generate() options)``."""
        new_images = [_open_image(i) for i in images]
        if new_images and not hasattr(self.model, "image_features"):
            raise ValueError(
                f"{self.model.pte_path.parent.name} is a text-only model: it takes no images. Load an "
                f"image-text-to-text model with ETModelForImageTextToText."
            )
        content: Any = text
        if new_images:
            content = [*({"type": "image"} for _ in new_images), {"type": "text", "text": text}]
        messages = [*self.messages, {"role": "user", "content": content}]
        all_images = [*self.images, *new_images]
        pixels: dict = {}
        if all_images:
            ids, pixels = self.render_with_images(messages, all_images)
        else:
            ids = self.render(messages)
        context = self.context_size
        room = context - len(ids)
        if room < 1:
            raise ContextFullError(
                f"the conversation needs {len(ids)} tokens with this message but the program's context "
                f"holds {context}: reset the chat to start over, or export with a larger max_seq_len."
            )
        options = {**self.generation_kwargs, **generation_kwargs}
        wanted = options.get("max_new_tokens") or self.model.generation_config.max_new_tokens
        options["max_new_tokens"] = min(wanted or DEFAULT_MAX_NEW_TOKENS, room)
        if pixels:  # earlier images' features come from the model's cache of them
            import torch

            options["image_features"] = self.model.image_features(torch.tensor([ids]), **pixels)
        return messages, all_images, ids, options

    def _finish_turn(self, messages, images, ids: list[int], new: list[int], cached: int, stats: GenerationStats) -> str:
        """Record a finished turn (reply, stats) and return the reply text."""
        row = ids + new
        self.images = images
        self.reply_ids = new
        reply = self.tokenizer.decode(self.reply_ids, skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        stats.extra.update(
            cached_tokens=cached,
            prefilled_tokens=len(ids) - cached,
            context_used=self.context_used,
            context_size=self.context_size,
            context_full=len(row) >= self.context_size,
        )
        self.stats = stats
        return reply


def _open_image(image):
    """A PIL image from a PIL image or a path (converted to RGB, as processors expect)."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from PIL import Image

        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read the image {image}: {e}") from e
    return image
