"""OpenAI request fields to a generation call, and generation records back to OpenAI's vocabulary.

A validated request (:mod:`.schemas`) becomes the prompt's token ids (the chat template for
messages, the tokenizer for a text prompt) and ``stream_generate()`` options: OpenAI's
``temperature`` (0 = greedy; omitted = the server's default if it was started with ``--do-sample`` or
``--temperature``, else OpenAI's: sampling at temperature 1), ``top_p``, ``stop``, ``seed`` (a per-request ``torch.Generator``, so
sampling is reproducible while other slots sample too), ``logit_bias`` (transformers'
``sequence_bias``) and ``presence_penalty``/``frequency_penalty`` (:class:`PresenceFrequencyPenalty`,
a logits processor). Limits are checked here, before a request waits for a slot, and a violation
is an :class:`~.schemas.APIError` naming the value, the limit and the fix. Going back,
:data:`FINISH_REASONS` maps our finish reasons to OpenAI's and :func:`token_logprob` formats
log-probabilities.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import LogitsProcessor

from .. import tools as tool_calls
from ..errors import ConstraintError, ETTransformersError
from .schemas import (
    UNSUPPORTED_REASONS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    TokenLogprob,
    TopLogprob,
    unsupported,
)

#: Our finish reasons (see ``GenerationResponse.finish_reason``) as OpenAI names them.
FINISH_REASONS = {
    "eos": "stop",
    "stop_string": "stop",
    "criteria": "stop",
    "grammar": "stop",
    "length": "length",
    "context": "length",
    "max_time": "length",
}

#: Options the server's defaults may hold that only apply when sampling.
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's presence and frequency penalties as a transformers logits processor.

    For every token that already appeared in the completion so far (the prompt does not count),
    ``presence_penalty`` is subtracted once and ``frequency_penalty`` once per appearance:
    ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]``.

    Args:
        prompt_length: tokens of the prompt at the start of ``input_ids`` (not penalized).
        presence_penalty: subtracted once from each token that appeared.
        frequency_penalty: subtracted per appearance.
    """

    def __init__(self, prompt_length: int, presence_penalty: float, frequency_penalty: float):
        self.prompt_length = prompt_length
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Penalized copy of ``scores`` ``[B, V]`` given ``input_ids`` ``[B, L]``."""
        completion = input_ids[:, self.prompt_length :]  # [B, new]
        if completion.shape[-1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, completion, torch.ones_like(completion, dtype=scores.dtype))
        return scores - self.presence_penalty * (counts > 0).to(scores.dtype) - self.frequency_penalty * counts


# -- prompts --------------------------------------------------------------------------------------


def chat_prompt(tokenizer, request: ChatCompletionRequest, model_type: str | None = None) -> list[int]:
    """The messages (and tools) through the tokenizer's chat template, ready for the assistant's reply.

    Raises:
        APIError: the tokenizer has no chat template, or invalid tools (400).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "This model's tokenizer has no chat template: use /v1/completions with a text "
                            "prompt instead.", param="messages", code="no_chat_template")
    messages = [m.as_dict() for m in request.messages]
    tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
    if tools is None and not any(m.role == "tool" or m.tool_calls for m in request.messages):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    try:
        return tool_calls.render(tokenizer, messages, tools, model_type=model_type)
    except ConstraintError as e:
        raise APIError(400, str(e), param="tools") from e


def decode_image(url: str, index: int):
    """The PIL image of a ``data:image/...;base64,`` URL.

    Raises:
        APIError: another kind of URL (this server fetches nothing), or data that is no image (400).
    """
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    param = f"messages[].content[].image_url (image {index})"
    head, sep, data = url.partition(",")
    if not (url.startswith("data:image/") and sep and head.endswith(";base64")):
        raise APIError(400, f"image {index} is not a data:image/...;base64, URL ({url[:40]!r}...): this server fetches "
                            f"no URLs; send the image's bytes inline, base64-encoded.", param=param,
                       code="invalid_image_url")
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise APIError(400, f"image {index} could not be decoded as an image ({e}).", param=param,
                       code="invalid_image") from e


def image_prompt(model, request: ChatCompletionRequest, urls: list[str]):
    """``(token ids, image features)`` of a chat whose messages show images: the messages through the
    model's processor, the images through its vision encoder.

    Raises:
        APIError: the model takes no images, tools with images, a bad image, or inputs the model
            refuses (its ValueError, 400).
    """
    if not hasattr(model, "prepare_inputs"):
        raise APIError(400, "This model is text-only: it takes no image_url content parts.", param="messages",
                       code="images_not_supported")
    if request.tools or any(m.role == "tool" or m.tool_calls for m in request.messages):
        raise APIError(400, "Tools and images in one request are not supported yet.", param="tools")
    images = [decode_image(url, i) for i, url in enumerate(urls)]
    messages = [m.as_dict() for m in request.messages]
    try:
        encoded = model.prepare_inputs(messages, images)
        ids = encoded.pop("input_ids")
        return ids[0].tolist(), model.image_features(ids, **encoded)
    except (ValueError, ETTransformersError) as e:
        raise APIError(400, str(e), param="messages") from e


def tool_plan(request: ChatCompletionRequest, tokenizer, model_type: str | None, vocab_size: int, eos_token_id=None):
    """``(format to parse the reply's tool calls with or None, response_format for generate() or None)``.

    ``tool_choice`` ``"required"`` or a named function constrains the reply to calls (each tool's
    arguments to its schema); ``"auto"`` (the default with tools) lets the model choose, and the
    reply is parsed for calls (a ``response_format`` then constrains the reply to a call or that
    JSON); ``"none"`` parses nothing. A forced call replaces ``response_format`` (the reply is
    calls, no content). ``parallel_tool_calls: false`` holds where the reply is constrained
    (``required``, a named function, ``auto`` with a ``response_format``); under plain ``auto`` the
    model may still write several calls, and all are returned. Tools' ``strict: false`` (and
    ``json_schema.strict: false``) is enforced anyway. Everything is compiled here, against the
    vocabulary and ``eos_token_id`` (the model's) that generation uses, before the request waits
    for a slot.

    Raises:
        APIError: an invalid or uncompilable ``response_format``, ``tools`` or ``tool_choice`` (400).
    """
    from ..constraints import FORMAT_KEYS, GrammarLogitsProcessor

    choice = request.tool_choice or ("auto" if request.tools else "none")
    if choice != "none" and not request.tools:
        raise APIError(400, f"tool_choice={choice!r} needs tools: send the tools the model may call, or drop "
                            f"tool_choice.", param="tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
    if tools:
        try:
            tool_calls.check_tools(tools)
        except ConstraintError as e:
            raise APIError(400, f"tools: {e}", param="tools", code="invalid_tools") from e
    rf, param = request.response_format, "response_format"
    if rf is not None and rf.get("type") not in FORMAT_KEYS:
        raise APIError(400, f"response_format type {rf.get('type')!r} is not valid: use 'text', 'json_object' or "
                            f"'json_schema' (or this server's 'regex', 'choice', 'grammar').", param=param,
                       code="invalid_response_format")
    if rf is not None and rf.get("type") == "text":
        rf = None
    fmt = None
    try:
        if choice != "none":
            fmt = tool_calls.tool_format_for(tokenizer, model_type)
            name = choice.function.name if not isinstance(choice, str) else None
            if choice != "auto":
                param = "tool_choice"  # set first: call_format's own errors (an unknown name) are tool_choice's
                rf = tool_calls.call_format(tools, fmt, name=name,
                                            parallel=name is None and request.parallel_tool_calls is not False)
            elif rf is not None:
                rf = tool_calls.call_format(tools, fmt, parallel=request.parallel_tool_calls is not False,
                                            or_response_format=rf)
        if rf is not None:
            # Compiles now (errors are 400s); the same eos ids as generation's, so its compile is a cache hit.
            GrammarLogitsProcessor(rf, tokenizer, vocab_size=vocab_size, eos_token_id=eos_token_id)
    except ConstraintError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_" + param) from e
    return fmt, rf


def completion_prompt(tokenizer, request: CompletionRequest, vocab_size: int) -> list[int]:
    """The prompt's token ids: a string tokenized, or token ids checked against the vocabulary.

    Raises:
        APIError: several prompts, an empty one, or ids outside the vocabulary (400).
    """
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt holds {len(prompt)} prompts; this server takes one prompt per request: "
                                f"send one request per prompt.", param="prompt")
        prompt = prompt[0]
    ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise APIError(400, "prompt is empty: it needs at least one token.", param="prompt")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size}).", param="prompt")
    return ids


# -- options --------------------------------------------------------------------------------------


def check_supported(request) -> None:
    """Raise a 400 naming the first field set to something the server does not implement (or that
    does not apply: ``stream_options`` without ``stream``)."""
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options applies to streamed responses only: set stream=true, or drop "
                            "stream_options.", param="stream_options")
    found = unsupported(request)
    if found is not None:
        name, value = found
        raise APIError(400, f"{name}={value!r} is not supported: {UNSUPPORTED_REASONS[name]}. Remove {name} "
                            f"from the request.", param=name, code="unsupported_parameter")


def _max_new_tokens(request, prompt_len: int, context: int, default: int) -> int:
    """The request's token budget, checked against what the context leaves after the prompt."""
    where = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the {where} has "
                            f"{prompt_len} tokens, leaving no room for a reply. Shorten the {where}, or export "
                            f"the model with a larger --max-seq-len.", param=where, code="context_length_exceeded")
    name, wanted = "max_tokens", request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        name, wanted = "max_completion_tokens", request.max_completion_tokens
    if wanted is None:
        return min(default, room)
    if wanted > room:
        raise APIError(400, f"{name}={wanted} with a {prompt_len}-token {where} needs {prompt_len + wanted} "
                            f"positions, but this model's maximum context length is {context} tokens: at most "
                            f"{room} new tokens fit. Lower {name}.", param=name, code="context_length_exceeded")
    return wanted


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[tuple[int, ...], float]:
    out = {}
    for key, value in bias.items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size}).", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias[{key!r}]={value} is outside [-100, 100].", param="logit_bias")
        out[(int(key),)] = float(value)
    return out


#: What OpenAI's API samples at when a request sets no ``temperature`` (and the server no default).
OPENAI_DEFAULT_TEMPERATURE = 1.0


def generation_options(request, prompt_len: int, *, context: int, vocab_size: int, defaults: dict) -> dict:
    """``stream_generate()`` keywords for ``request``, over the server's ``defaults``.

    Args:
        request: a validated chat or completion request.
        prompt_len: tokens of its prompt.
        context: the program's context (KV-cache positions).
        vocab_size: size of the program's vocabulary.
        defaults: the server's generation options (from the command line); ``max_new_tokens`` there
            is the budget of a request that sets none (shortened to what the context leaves).

    Raises:
        APIError: a limit the request exceeds (400). Unsupported fields are :func:`check_supported`'s.
    """
    options = {k: v for k, v in defaults.items() if k != "max_new_tokens"}
    options["max_new_tokens"] = _max_new_tokens(request, prompt_len, context, defaults.get("max_new_tokens", 256))
    temperature = request.temperature
    if temperature is None and "do_sample" not in defaults and "temperature" not in defaults:
        temperature = OPENAI_DEFAULT_TEMPERATURE
    if temperature is not None:
        options["do_sample"] = temperature > 0
        if options["do_sample"]:
            options["temperature"] = temperature
    elif "temperature" in defaults:
        options["do_sample"] = defaults["temperature"] > 0 or bool(defaults.get("do_sample"))
    if request.top_p is not None:
        options["top_p"] = request.top_p
    if not options.get("do_sample"):
        if request.top_p is not None and request.top_p < 1:
            raise APIError(400, f"top_p={request.top_p} applies to sampling, but this request decodes greedily "
                                f"(temperature={temperature}). Set temperature > 0 to sample, or drop top_p.",
                           param="top_p")
        for name in _SAMPLING_ONLY:
            options.pop(name, None)
    elif request.seed is not None:
        options["rng"] = torch.Generator().manual_seed(request.seed)
    stops = request.stop_strings()
    if stops:
        options["stop_strings"] = stops
    if request.logit_bias:
        options["sequence_bias"] = _logit_bias(request.logit_bias, vocab_size)
    if request.presence_penalty or request.frequency_penalty:
        options["logits_processor"] = [
            PresenceFrequencyPenalty(prompt_len, request.presence_penalty, request.frequency_penalty)
        ]
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs and not request.logprobs:
            raise APIError(400, f"top_logprobs={request.top_logprobs} needs logprobs=true.", param="top_logprobs")
        options["logprobs"] = bool(request.logprobs)
        options["top_logprobs"] = (request.top_logprobs or 0) if request.logprobs else 0
    else:
        options["logprobs"] = request.logprobs is not None
        options["top_logprobs"] = request.logprobs or 0
    return options


# -- results --------------------------------------------------------------------------------------


def token_text(tokenizer, token: int) -> str:
    """One token's text (special tokens included, as OpenAI's logprobs show them)."""
    return tokenizer.decode([token], skip_special_tokens=False)


def token_logprob(tokenizer, token: int, logprob: float, top: list[tuple[int, float]] | None) -> TokenLogprob:
    """A chat logprobs entry: the token, its log-probability, its bytes and the top alternatives."""

    def entry(t: int, lp: float) -> TopLogprob:
        text = token_text(tokenizer, t)
        return TopLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))

    chosen = entry(token, logprob)
    return TokenLogprob(**chosen.model_dump(), top_logprobs=[entry(t, lp) for t, lp in top or []])
