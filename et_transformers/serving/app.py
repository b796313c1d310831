"""The OpenAI-compatible HTTP routes: a FastAPI app over a pool of slots.

:func:`create_app` builds the app for a list of loaded models (one per slot, the same program):
``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` (each streamed as
server-sent events with ``stream: true``, through sse-starlette), ``GET /health`` and
``GET /metrics``. A route validates its request (:mod:`.schemas`), turns it into token ids and
generation options (:mod:`.translation`), gets a slot (:mod:`.slots`) and relays the slot's token
records as OpenAI objects. Every failure answers in OpenAI's error shape, ``{"error": {"message",
"type", "param", "code"}}``: malformed JSON and unknown or unsupported fields 400, wrong types or
values 422, a missing or wrong API key 401, an unknown model 404, a full queue 429 with
``Retry-After``, a crash of the generation 500; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import Metrics
from .schemas import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
)
from .slots import Job, QueueFull, SlotPool
from .tool_schemas import ToolCallDelta, ToolCallOut
from .translation import (
    FINISH_REASONS,
    chat_prompt,
    image_prompt,
    check_supported,
    completion_prompt,
    generation_options,
    token_logprob,
    token_text,
    tool_plan,
)
from ..tools import ToolCallStream, parse

logger = logging.getLogger(__name__)

#: Routes counted by name in the metrics (anything else counts as "other").
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def _error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class _Gate:
    """ASGI middleware: checks the API key on ``/v1/`` routes and counts every response by route
    and status (pure ASGI, so a streamed response's disconnects reach it untouched)."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = given.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(key.strip(), self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and path.startswith("/v1/") and not self._authorized(scope):
                response = _error_response(
                    401, "Missing or incorrect API key: send it as the header 'Authorization: Bearer <key>' "
                         "(the key the server was started with, --api-key).",
                    type="authentication_error", code="invalid_api_key")
                await response(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(route=path if path in ROUTES else "other", status=status["code"]).inc()


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """A pydantic error as OpenAI's: 400 for unparseable JSON and unknown fields, else 422."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return _error_response(400, f"We could not parse the JSON body of your request ({detail}). Send a "
                                    f"valid JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return _error_response(400, f"Unrecognized request argument supplied: {param}. Remove it (see the "
                                    f"OpenAI API reference for the fields this endpoint takes).",
                               param=param, code="unknown_parameter")
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    where = param or "the request body"
    return _error_response(422, f"{where}: {first.get('msg', 'invalid value')} (got {got}).", param=param,
                           code=kind or None)


def _usage(job: Job, prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=job.cached_tokens))


def create_app(models: list, *, model_id: str, api_key: str | None = None, max_queue: int = 16,
               defaults: dict | None = None) -> FastAPI:
    """The OpenAI-compatible app serving ``models``, one per slot.

    Args:
        models: loaded ``ETModelForCausalLM`` objects of one program (the first and its
            ``replica()``s); each is a slot with its own KV cache.
        model_id: the name clients pass as ``model`` (``GET /v1/models`` lists it); another name
            gets 404.
        api_key: when set, every ``/v1/`` request needs ``Authorization: Bearer <api_key>``.
        max_queue: requests that may wait for a slot; one more gets 429.
        defaults: ``generate()`` options of a request that does not set them (``max_new_tokens``
            is the budget of a request without ``max_tokens``, shortened to the context).

    Returns:
        The FastAPI app; ``app.state.pool`` is its :class:`~.slots.SlotPool`, ``app.state.metrics``
        its :class:`~.metrics.Metrics`.

    Raises:
        TokenizerError: the models have no tokenizer.
    """
    tokenizer = models[0].require_tokenizer("the server")
    meta = models[0].program.metadata
    model_type = getattr(models[0].config, "model_type", None)  # picks the tool-call format
    defaults = dict(defaults or {})
    pool = SlotPool(models, max_queue)
    metrics = Metrics(pool)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        pool.close()

    app = FastAPI(title="et_transformers", summary="OpenAI-compatible server on ExecuTorch", lifespan=lifespan)
    app.state.pool, app.state.metrics = pool, metrics
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)

    # -- errors --------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error_response(404, f"No route {request.url.path}: this server has {', '.join(ROUTES)}.",
                                   code="not_found")
        return _error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception):
        logger.exception("request failed")
        return _error_response(500, f"The server failed on this request ({type(exc).__name__}: {exc}).",
                               type="server_error")

    # -- shared steps --------------------------------------------------------------------------

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"The model {name!r} does not exist: this server serves {model_id!r} "
                                f"(see GET /v1/models).", param="model", code="model_not_found")

    def label(cid: str, request) -> str:
        return f"{cid} (user {request.user!r})" if request.user else cid

    def options_for(request, ids: list[int]) -> dict:
        return generation_options(request, len(ids), context=meta.max_context_len, vocab_size=meta.vocab_size,
                                  defaults=defaults)

    def on_done(job: Job) -> None:
        metrics.finished(job.stats, len(job.ids), job.cached_tokens, job.ttft)
        logger.info("slot %d: %s: %d prompt tokens (%d cached), %d generated, TTFT %s", job.slot.index, job.label,
                    len(job.ids), job.cached_tokens, len(job.new_tokens),
                    f"{job.ttft * 1000:.0f} ms" if job.ttft is not None else "-")

    async def start(ids: list[int], options: dict, label: str):
        """A running job and its first record (so a bad request fails before any header is sent)."""
        try:
            slot = await pool.acquire(ids)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from e
        job = Job(slot, ids, options, label=label)
        job.start(pool, on_done)
        records = job.records()
        try:
            first = await anext(records)
        except ValueError as e:  # our generate() checks: bad values the schemas could not see
            raise APIError(400, str(e)) from e
        except BaseException:
            job.cancel()
            raise
        return job, first, records

    async def collect(job: Job, first, records) -> list:
        try:
            return [first] + [r async for r in records]
        finally:
            job.cancel()  # no-op once finished; stops the generation if this request was cancelled

    async def sse(job: Job, events):
        """Server-sent events of OpenAI objects, then ``[DONE]``; stops the job if the client leaves."""
        try:
            async for event in events:
                yield event.model_dump_json() if hasattr(event, "model_dump_json") else event
            yield "[DONE]"
        except Exception as e:  # the generation failed after the headers: report it in the stream
            logger.exception("streamed generation failed")
            yield ErrorBody(error=ErrorDetail(message=f"The generation failed ({type(e).__name__}: {e}).",
                                              type="server_error")).model_dump_json()
        finally:
            job.cancel()

    # -- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        """Liveness and load: slots, busy slots, queued requests."""
        return {"status": "ok", "model": model_id, "slots": len(pool.slots), "slots_busy": pool.busy,
                "queue": pool.queued, "max_queue": pool.max_queue, "context": meta.max_context_len}

    @app.get("/metrics")
    async def prometheus_metrics():
        """Prometheus text format."""
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        """The one model this server serves."""
        return ModelList(data=[ModelCard(id=model_id)])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        """A chat reply through the model's chat template; streamed with ``stream: true``."""
        check_model(body.model)
        check_supported(body)
        fmt, response_format = tool_plan(body, tokenizer, model_type, meta.vocab_size,
                                         eos_token_id=models[0].generation_config.eos_token_id)
        images = [url for m in body.messages for url in m.image_urls()]
        if images:
            ids, image_features = await asyncio.to_thread(image_prompt, models[0], body, images)
        else:
            ids, image_features = chat_prompt(tokenizer, body, model_type), None
        options = options_for(body, ids)
        if image_features is not None:
            options["image_features"] = image_features
        if response_format is not None:
            options["response_format"] = response_format
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        job, first, records = await start(ids, options, label(cid, body))

        def logprobs(r) -> ChatLogprobs | None:
            return ChatLogprobs(content=[token_logprob(tokenizer, r.token, r.logprob, r.top_logprobs)]) \
                if body.logprobs else None

        def finish_of(last, calls: int) -> str:
            return "tool_calls" if calls else FINISH_REASONS[last.finish_reason]

        if not body.stream:
            parts = await collect(job, first, records)
            content = [token_logprob(tokenizer, r.token, r.logprob, r.top_logprobs) for r in parts] \
                if body.logprobs else None
            text, calls = "".join(r.text for r in parts), []
            if fmt is not None:
                text, calls = parse(text, fmt)
            message = AssistantMessage(content=text or None if calls else text,
                                       tool_calls=[ToolCallOut(**c.as_openai()) for c in calls] or None)
            choice = ChatChoice(message=message, logprobs=ChatLogprobs(content=content) if content is not None else None,
                                finish_reason=finish_of(parts[-1], len(calls)))
            return ChatCompletion(id=cid, model=model_id, choices=[choice], usage=_usage(job, len(ids), len(parts)))

        async def chunks():
            def chunk(delta: Delta, **fields):
                return ChatCompletionChunk(id=cid, model=model_id, choices=[ChatChunkChoice(delta=delta, **fields)],
                                           usage=None)

            def deltas(events, r=None):
                """Chunks of splitter events: content as is, each call as a header then its arguments."""
                text = "".join(e for kind, e in events if kind == "content")
                if (called or any(kind == "call" for kind, _ in events)) and not text.strip():
                    text = ""  # the newlines around calls: a whole reply's content drops them too (parse)
                if text or (r is not None and body.logprobs):
                    yield chunk(Delta(content=text), logprobs=logprobs(r) if r is not None else None)
                for kind, call in events:
                    if kind == "call":
                        index = len(called)
                        called.append(call)
                        yield chunk(Delta(tool_calls=[ToolCallDelta(index=index, id=call.id, type="function",
                                                                    function={"name": call.name, "arguments": ""})]))
                        yield chunk(Delta(tool_calls=[ToolCallDelta(index=index, function={"arguments": call.arguments})]))

            called: list = []
            splitter = ToolCallStream(fmt) if fmt is not None else None
            yield chunk(Delta(role="assistant", content=""))
            n, r = 0, first
            while r is not None:
                n += 1
                if splitter is not None:
                    for c in deltas(splitter.feed(r.text), r):
                        yield c
                elif r.text or body.logprobs:
                    yield chunk(Delta(content=r.text), logprobs=logprobs(r))
                last, r = r, await anext(records, None)
            if splitter is not None:
                for c in deltas(splitter.finish()):
                    yield c
            yield chunk(Delta(), finish_reason=finish_of(last, len(called)))
            if body.stream_options and body.stream_options.include_usage:
                yield ChatCompletionChunk(id=cid, model=model_id, choices=[], usage=_usage(job, len(ids), n))

        return EventSourceResponse(sse(job, chunks()))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        """A continuation of a text prompt (or of token ids); streamed with ``stream: true``."""
        check_model(body.model)
        check_supported(body)
        ids = completion_prompt(tokenizer, body, meta.vocab_size)
        cid = f"cmpl-{uuid.uuid4().hex}"
        job, first, records = await start(ids, options_for(body, ids), label(cid, body))

        def logprobs(parts, offset: int) -> CompletionLogprobs | None:
            if body.logprobs is None:
                return None
            offsets, at = [], offset
            for r in parts:
                offsets.append(at)
                at += len(r.text)
            top = [{token_text(tokenizer, t): lp for t, lp in r.top_logprobs or []} for r in parts]
            return CompletionLogprobs(tokens=[token_text(tokenizer, r.token) for r in parts],
                                      token_logprobs=[r.logprob for r in parts],
                                      top_logprobs=top if body.logprobs else None, text_offset=offsets)

        if not body.stream:
            parts = await collect(job, first, records)
            choice = CompletionChoice(text="".join(r.text for r in parts), logprobs=logprobs(parts, 0),
                                      finish_reason=FINISH_REASONS[parts[-1].finish_reason])
            return Completion(id=cid, model=model_id, choices=[choice], usage=_usage(job, len(ids), len(parts)))

        async def chunks():
            n, offset, r = 0, 0, first
            while r is not None:
                n += 1
                if r.text or body.logprobs is not None:
                    yield Completion(id=cid, model=model_id,
                                     choices=[CompletionChoice(text=r.text, logprobs=logprobs([r], offset))])
                offset += len(r.text)
                last, r = r, await anext(records, None)
            yield Completion(id=cid, model=model_id,
                             choices=[CompletionChoice(text="", finish_reason=FINISH_REASONS[last.finish_reason])])
            if body.stream_options and body.stream_options.include_usage:
                yield Completion(id=cid, model=model_id, choices=[], usage=_usage(job, len(ids), n))

        return EventSourceResponse(sse(job, chunks()))

    return app
