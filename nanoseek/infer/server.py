"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions.

    app = create_app(engine, "my-model", Limits(), api_key=None)   # FastAPI app; its lifespan runs the scheduler
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every request becomes one `Sequence` per choice (n per prompt) in the engine's continuous-batching
`Scheduler`, so concurrent requests decode in one batch. `stream: true` answers with server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`; `stream_options.include_usage` adds
a usage chunk. Sampling fields: temperature, top_p, top_k (an extension, as in vLLM), seed,
stop, max_tokens (chat also max_completion_tokens), n (the n choices of a prompt share one prefill),
and the sampled tokens' log-probabilities (completions `logprobs: 0`, chat `logprobs: true`; the
top alternatives, `logprobs > 0` / `top_logprobs > 0`, are not computed and refused). Fields that would
change the output but are not implemented (penalties, logit_bias, tools, ...) are refused with a 400;
other unknown fields are ignored, each name logged once. Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`.

Reliability (docs/reliability.md): the access checks run first (`nanoseek.infer.access`), then the
body is read up to `Limits.max_body_bytes`; parsing, chat rendering and tokenizing run on a small
worker pool, never on the event loop (`nanoseek.infer.protocol` checks each field and limit). A
client that goes away cancels its request, streaming or not. A 500 says only that the server
failed and the request id; the details go to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.infer.access import AccessGuard
from nanoseek.infer.engine import ContextLengthError, Engine
from nanoseek.infer.protocol import (
    BIG_REQUEST,
    APIError,
    ChatRequest,
    CompletionRequest,
    Limits,
    OpenAIRequest,
    check_limits,
    check_prompt_chars,
    check_prompt_tokens,
    error_body,
    limit_error,
    parse_request,
    prompt_list,
    release_memory,
)
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.scheduler import Scheduler
from nanoseek.infer.sequence import Sequence

log = logging.getLogger(__name__)
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.Generator.manual_seed takes (choice i adds i)


def create_app(engine: Engine, model_name: str, limits: Limits | None = None, *, api_key: str | None = None,
               allowed_hosts: Seq[str] | None = None, workers: int = 2) -> FastAPI:
    """The FastAPI app serving `engine` under the model id `model_name`.

    limits: bounds on each request (`Limits()` defaults); api_key: require `Authorization: Bearer
    <key>` on /v1; allowed_hosts: the Host names clients may use (None: any); workers: threads that
    parse, render and tokenize requests off the event loop.
    """
    limits = limits or Limits()
    scheduler = Scheduler(engine)
    created = int(time.time())
    unknown_fields: set[str] = set()
    pool: ThreadPoolExecutor | None = None  # made by the lifespan (so an app can be started again)
    tokenizer = engine.tokenizer

    # text longer than this cannot fit the context, whatever it encodes to: refused before tokenizing
    longest = getattr(tokenizer, "max_token_chars", None)
    fits = 2 * (limits.max_prompt_tokens or engine.max_len) * longest if longest else None

    def encode(texts: list[str | list[int]], raw: bool) -> list[list[int]]:
        """On a worker: raw prompts as transformers tokenizes them (`encode_prompt`: e.g. with BOS),
        rendered chat as it is; token-id prompts pass through."""
        fn = getattr(tokenizer, "encode_prompt", tokenizer.encode) if raw else tokenizer.encode
        ids = [fn(t) if isinstance(t, str) else t for t in texts]
        if sum(len(t) for t in texts if isinstance(t, str)) > BIG_REQUEST // 4:
            release_memory()
        return ids

    async def off_loop(fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal pool
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nanoseek-prep")
        scheduler.start()
        yield
        scheduler.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nanoseek", lifespan=lifespan)
    app.state.scheduler, app.state.limits = scheduler, limits
    app.add_middleware(AccessGuard, api_key=api_key, allowed_hosts=allowed_hosts,
                       max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(status_code=exc.status_code, headers=getattr(exc, "headers", None),  # 405 keeps Allow
                            content=error_body(message, code=str(exc.status_code)))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        rid = uuid.uuid4().hex[:12]
        log.error("request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=exc)
        return JSONResponse(status_code=500, content=error_body(
            f"internal server error (request {rid}); the server log has the details", "server_error"))

    async def parse(request: Request, schema: type[OpenAIRequest]) -> Any:
        body, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a chunked body has no Content-Length
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise limit_error("max_body_bytes", f"the body has more than {limits.max_body_bytes:,} bytes",
                                  status=413)
            body.append(chunk)
        data = b"".join(body)
        del body
        try:
            req = await off_loop(parse_request, data, schema, limits, unknown_fields)
        finally:
            del data
            if size > BIG_REQUEST:
                await off_loop(release_memory)
        if req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return req

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = prompt_list(req.prompt)
        stop = check_limits(req, limits, len(prompts))
        for p in prompts:
            if isinstance(p, str):
                check_prompt_chars(p, limits, "prompt", fits)
        if any(isinstance(p, str) for p in prompts) and tokenizer is None:
            raise APIError(400, "this server has no tokenizer; send the prompt as token ids", param="prompt")
        ids = await off_loop(encode, prompts, True)
        for p in ids:
            check_prompt_tokens(p, limits, engine.max_len, "prompt")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        logprobs = req.wants_logprobs()
        seqs = _submit(scheduler, limits, ids, req, stop, max_tokens, param="prompt", logprobs=logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        _log_request(rid, req, len(prompts), max_tokens)
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}

        text_at = [0] * len(seqs)  # per choice: text offset after the tokens handed out (streams run in order)

        def choice(i: int, text: str, finish: str | None, tokens: slice) -> dict:
            lp = None
            if logprobs:
                lp = _completion_logprobs(engine, seqs[i], tokens, text_at[i] if tokens.start else 0)
                text_at[i] = lp["text_offset"][-1] + len(lp["tokens"][-1]) if lp["tokens"] else text_at[i]
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

        if req.stream:
            async def chunks() -> AsyncIterator[dict]:
                async for i, delta, finish, tokens in _events(scheduler, seqs, rid):
                    if delta or finish or (logprobs and tokens.stop > tokens.start):
                        yield {**head, "choices": [choice(i, delta, finish, tokens)]}
                if _include_usage(req):
                    yield {**head, "choices": [], "usage": _usage(seqs, req.n)}
            return _sse(chunks())
        if not await _finish(request, scheduler, seqs, rid):
            return Response(status_code=499)  # the client has gone; nobody reads this
        return {**head, "choices": [choice(i, s.text, s.finish_reason, slice(None)) for i, s in enumerate(seqs)],
                "usage": _usage(seqs, req.n)}

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatRequest))
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        if not req.messages:
            raise APIError(400, "messages is empty; send at least one {'role': 'user', 'content': ...}",
                           param="messages")
        stop = check_limits(req, limits, 1)
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer, so no chat template; use /v1/completions with "
                                "token ids", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt = await off_loop(tokenizer.apply_chat_template, messages)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        check_prompt_chars(prompt, limits, "messages", fits)
        (ids,) = await off_loop(encode, [prompt], False)
        check_prompt_tokens(ids, limits, engine.max_len, "messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(engine.max_len - len(ids), 1)
        logprobs = req.wants_logprobs()
        seqs = _submit(scheduler, limits, [ids], req, stop, max_tokens, param="messages", logprobs=logprobs)

        def chat_logprobs(i: int, tokens: slice) -> dict | None:
            return _chat_logprobs(engine, seqs[i], tokens) if logprobs else None

        rid = f"chatcmpl-{uuid.uuid4().hex}"
        _log_request(rid, req, 1, max_tokens)
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}

        if req.stream:
            async def chunks() -> AsyncIterator[dict]:
                for i in range(len(seqs)):
                    delta = {"role": "assistant", "content": ""}
                    yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}
                async for i, text, finish, tokens in _events(scheduler, seqs, rid):
                    if text or (logprobs and tokens.stop > tokens.start):  # held-back text: its tokens' values
                        yield {**head, "choices": [{"index": i, "delta": {"content": text},
                                                    "logprobs": chat_logprobs(i, tokens), "finish_reason": None}]}
                    if finish:
                        yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                    "finish_reason": finish}]}
                if _include_usage(req):
                    yield {**head, "choices": [], "usage": _usage(seqs, req.n)}
            return _sse(chunks())
        if not await _finish(request, scheduler, seqs, rid):
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                    "logprobs": chat_logprobs(i, slice(None)), "finish_reason": s.finish_reason}
                   for i, s in enumerate(seqs)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(seqs, req.n)}

    return app


# ---------------------------------------------------------------------------- helpers
def request_body(schema: type[OpenAIRequest]) -> dict:
    """The route's OpenAPI requestBody (the routes read the raw body themselves, so FastAPI cannot
    infer it): the model's JSON schema with its $defs inlined."""
    full = schema.model_json_schema()
    defs = full.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"$ref"}:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(full)}}}}


def _log_request(rid: str, req: OpenAIRequest, n_prompts: int, max_tokens: int) -> None:
    log.info("%s: %d prompt(s) x n=%d, max_tokens=%d%s", rid, n_prompts, req.n, max_tokens,
             f", user={req.user[:64]!r}" if req.user else "")


def _submit(scheduler: Scheduler, limits: Limits, prompts: list[list[int]], req: OpenAIRequest, stop: list[str],
            max_tokens: int, param: str, logprobs: bool = False) -> list[Sequence]:
    """Check the settings, then queue n sequences per prompt (in that order), all reporting to one new
    `_Bridge`. The engine checks each prompt and the token budget (`Engine.sequence`)."""
    if max_tokens < 1:
        raise APIError(400, f"max_tokens={max_tokens}: must be >= 1", param="max_tokens")
    if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1] - req.n:
        raise APIError(400, f"seed={req.seed}: must lie in [-2**63, 2**63 - 1 - n]", param="seed")
    params = []
    for i in range(req.n):
        try:
            params.append(SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, max_new_tokens=max_tokens,
                stop=tuple(stop), seed=None if req.seed is None else req.seed + i, logprobs=logprobs))
        except ValueError as e:
            name = str(e).split("=")[0]
            raise APIError(400, str(e), param=name if name in OpenAIRequest.model_fields else None) from None
    queued = len(prompts) * req.n
    if scheduler.waiting + queued > limits.max_waiting:
        raise limit_error("max_waiting", f"the server has {scheduler.waiting:,} sequences waiting and this request "
                          f"adds {queued:,}; retry later", status=429)
    seqs, bridge = [], _Bridge()
    try:
        for ids in prompts:
            if not ids:
                raise APIError(400, f"the {param} encodes to no tokens; send some text", param=param)
            for sp in params:
                seqs.append(scheduler.submit(ids, sp, bridge))
    except (APIError, ValueError) as e:
        for s in seqs:
            scheduler.cancel(s)
        if isinstance(e, APIError):
            raise
        if isinstance(e, ContextLengthError):
            raise APIError(400, f"max_tokens={max_tokens}: {e}", param="max_tokens",
                           code="context_length_exceeded") from None
        raise APIError(400, str(e), param=param) from None
    return seqs


async def _finish(request: Request, scheduler: Scheduler, seqs: list[Sequence], rid: str) -> bool:
    """Wait for a non-streaming request's sequences; False (and the sequences cancelled) if the
    client disconnects first."""
    drain = asyncio.ensure_future(_drain(scheduler, seqs, rid))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({drain, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (gone, drain):
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task  # drain's cleanup cancels the unfinished sequences
    if drain.cancelled():
        log.info("%s: the client went away; its request was cancelled", rid)
        return False
    drain.result()  # raises the request's APIError, if any
    return True


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read: the next ASGI message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _token_texts(engine: Engine, seq: Sequence, tokens: slice) -> tuple[list[str], list[float]]:
    ids = seq.token_ids[tokens]
    return [engine.tokenizer.decode([t]) for t in ids], seq.logprobs[tokens]


def _completion_logprobs(engine: Engine, seq: Sequence, tokens: slice, at: int) -> dict:
    """The legacy completions `logprobs` object for the generated tokens in `tokens`, whose text starts
    at offset `at` (kept by the caller: recounting it per chunk would cost O(n^2) over a stream)."""
    texts, values = _token_texts(engine, seq, tokens)
    offsets = []
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": values, "top_logprobs": None, "text_offset": offsets}


def _chat_logprobs(engine: Engine, seq: Sequence, tokens: slice) -> dict:
    """The chat `logprobs` object (`content`: one entry per generated token in `tokens`)."""
    texts, values = _token_texts(engine, seq, tokens)
    return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "replace")), "top_logprobs": []}
                        for t, v in zip(texts, values)]}


class _Bridge:
    """Hands scheduler events (on its thread) to one request's asyncio queue, with the finish
    reason as it was when the event happened."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Sequence, str, str | None, int]] = asyncio.Queue()

    def __call__(self, seq: Sequence, delta: str) -> None:
        event = (seq, delta, seq.finish_reason, len(seq.token_ids))
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


async def _events(scheduler: Scheduler, seqs: list[Sequence],
                  rid: str) -> AsyncIterator[tuple[int, str, str | None, slice]]:
    """(choice index, text delta, finish reason or None, the slice of token_ids that arrived with this
    event) until every sequence finished.

    Cancels the unfinished ones when the consumer stops early (client gone). A failed or
    cancelled sequence raises APIError.
    """
    index = {id(s): i for i, s in enumerate(seqs)}
    seen = [0] * len(seqs)  # tokens handed out per choice
    bridge = seqs[0].on_event
    left = len(seqs)
    try:
        while left:
            seq, delta, finish, n_tokens = await bridge.queue.get()
            if finish in ("error", "cancelled"):
                if finish == "error":
                    log.error("%s: generation failed: %r", rid, seq.error)
                    raise APIError(500, f"generation failed (request {rid}); the server log has the details",
                                   type_="server_error")
                raise APIError(503, "the server is shutting down; retry later", type_="server_error")
            left -= finish is not None
            i = index[id(seq)]
            tokens, seen[i] = slice(seen[i], n_tokens), n_tokens
            yield i, delta, finish, tokens
    finally:
        for s in seqs:
            if not s.finished:
                scheduler.cancel(s)


async def _drain(scheduler: Scheduler, seqs: list[Sequence], rid: str) -> None:
    async for _ in _events(scheduler, seqs, rid):
        pass


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
        except Exception:  # the status line (200) is gone: end the stream with an error event, no internals
            rid = uuid.uuid4().hex[:12]
            log.exception("stream %s failed", rid)
            yield f"data: {json.dumps(error_body(f'internal server error (request {rid})', 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


def _include_usage(req: OpenAIRequest) -> bool:
    return bool(req.stream_options and req.stream_options.get("include_usage"))


def _usage(seqs: list[Sequence], n: int) -> dict:
    """Token counts; a prompt counts once however many choices (n) it has."""
    prompt = sum(len(s.prompt_ids) for s in seqs[::n])
    completion = sum(len(s.token_ids) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
