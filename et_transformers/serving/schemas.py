"""The server's wire format: pydantic models of OpenAI's request and response bodies.

Requests are validated here (types, ranges, unknown fields) before any model work: a body that
does not parse becomes an HTTP error in OpenAI's error shape (see :mod:`.app`). Fields that the
OpenAI API defines but this server does not implement are declared too, so that :func:`unsupported`
can refuse them by name (400) instead of letting them pass silently; a field OpenAI does not define
at all is refused by ``extra="forbid"``. Responses are built from the models below, so what the
server sends is what the official clients parse.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .tool_schemas import NamedToolChoice, Tool, ToolCallDelta, ToolCallOut, ToolCallParam

# -- requests ------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """``stream_options``: with ``include_usage``, a last chunk carries the usage."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    """A text part of a message's content (the only part type a text model takes)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    """``image_url`` of an image part: a ``data:image/...;base64,`` URL (this server fetches nothing)."""

    model_config = ConfigDict(extra="forbid")
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    """An image part of a user message's content (image-text-to-text models only)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    """One message of a conversation. ``developer`` is OpenAI's newer name for ``system`` and is
    rendered as a system message by the chat template; ``tool`` carries a tool's result. ``name``
    is passed to the chat template (most ignore it)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    # What clients send back with an assistant message they received (the openai SDK's message
    # object); accepted when empty, as they carry nothing this server produces.
    refusal: None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with tool_calls may omit it)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined; empty when there is none)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        """The URLs of the content's image parts, in order."""
        return [] if isinstance(self.content, (str, type(None))) else [
            p.image_url.url for p in self.content if isinstance(p, ImagePart)]

    def as_dict(self) -> dict:
        """The message as the chat template (and :func:`et_transformers.tools.render`) takes it."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.image_urls():  # the processor's chat template places each image where its part is
            out["content"] = [{"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                              for p in self.content]
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
            out["content"] = self.text() or None
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:  # the chat template's to use (most ignore it); a tool result's function
            out["name"] = self.name
        return out


#: OpenAI request fields the server does not implement, with the values that mean "not used"
#: (sent by clients that fill in defaults). Any other value is refused with a 400 naming the field.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}

#: Why each unsupported field is refused, for the error message.
UNSUPPORTED_REASONS = {
    "n": "one choice per request: send the request n times (with different seeds to sample)",
    "best_of": "one completion per request",
    "echo": "the prompt is not echoed: it is the text you sent",
    "suffix": "insertion (fill-in-the-middle) is not supported",
    "functions": "the deprecated functions API is not supported: use tools",
    "function_call": "the deprecated functions API is not supported: use tool_choice",
    "modalities": "the model produces text only",
    "audio": "the model produces text only",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the model has no reasoning-effort setting",
    "web_search_options": "the server has no web search",
    "store": "the server stores no completions",
    "metadata": "the server stores no completions to attach metadata to",
    "service_tier": "the server has one service tier",
}


class _GenerationRequest(BaseModel):
    """Fields both endpoints take."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Declared to be refused by name (see UNSUPPORTED_FIELDS), never used.
    n: int | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None

    def stop_strings(self) -> list[str]:
        """``stop`` as a list (empty strings dropped: they would match everywhere)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions`` (one prompt: a string or token ids)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


def unsupported(request: _GenerationRequest) -> tuple[str, Any] | None:
    """The first field of ``request`` set to something the server does not implement, as
    ``(name, value)``; None when there is none."""
    for name, off in UNSUPPORTED_FIELDS.items():
        if name in type(request).model_fields:
            value = getattr(request, name)
            if not any(value == o and type(value) is type(o) for o in off):
                return name, value
    return None


# -- responses -----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    """How many prompt tokens came from the prompt cache (not prefilled again)."""

    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """The chosen token at a position, with the most likely alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """``choices[].logprobs`` of a chat completion."""

    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    """``choices[].logprobs`` of a (legacy) completion."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class AssistantMessage(BaseModel):
    """The reply of a chat completion (``content`` is null when the reply is only tool calls)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


def _created() -> int:
    return int(time.time())


class _Response(BaseModel):
    """What every completion object and chunk carries."""

    id: str
    created: int = Field(default_factory=_created)
    model: str


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(_Response):
    """A non-streamed chat completion."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """What a chat chunk adds to the reply."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a chat chunk."""

    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    """One ``data:`` event of a streamed chat completion (the last one, with
    ``stream_options.include_usage``, has no choices and the usage)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    """One choice of a completion, or of one streamed completion chunk."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(_Response):
    """A completion, or one ``data:`` event of a streamed one (same object type, as OpenAI's)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """An entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_created)
    owned_by: str = "et_transformers"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """OpenAI's error object: what went wrong, its kind, the request field at fault, a code."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """The body of every error response: ``{"error": {...}}``."""

    error: ErrorDetail


class APIError(Exception):
    """An error a route answers with: an HTTP status and OpenAI's error body.

    Args:
        status: the HTTP status.
        message: what went wrong, naming the value, the limit and the fix.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, if any.
        code: a machine-readable code (``context_length_exceeded``, ``model_not_found``, ...).
        headers: extra response headers (``Retry-After``).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code))
        self.headers = headers or {}
