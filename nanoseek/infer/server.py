"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions.

    app = create_app(engine, "my-model")     # FastAPI app; its lifespan starts/stops the scheduler
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every request becomes one `Sequence` per choice (n per prompt) in the engine's continuous-batching
`Scheduler`, so concurrent requests decode in one batch. `stream: true` answers with server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`; `stream_options.include_usage` adds
a usage chunk. Sampling fields: temperature, top_p, top_k (an extension, as in vLLM), seed,
stop, max_tokens (chat also max_completion_tokens), n (the n choices of a prompt share one prefill),
and the sampled tokens' log-probabilities (completions `logprobs: 0`, chat `logprobs: true`; the
top alternatives, `logprobs > 0` / `top_logprobs > 0`, are not computed and refused). Fields that would
change the output but are not implemented (penalties, logit_bias, tools, ...) are refused with a 400;
other unknown fields are ignored with a logged warning. Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.infer.engine import ContextLengthError, Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.scheduler import Scheduler
from nanoseek.infer.sequence import Sequence

log = logging.getLogger(__name__)

# Fields that would change the output if honoured: refused unless they hold their neutral value.
UNSUPPORTED = {"echo": (None, False),
               "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"})}


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.type, self.param, self.code))


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------------- request bodies
class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # 0: the sampled tokens' log-probabilities; more: top alternatives (refused)

    def wants_logprobs(self) -> bool:
        if self.logprobs is not None and self.logprobs != 0:
            raise APIError(400, f"logprobs={self.logprobs}: the top alternatives are not supported; use logprobs=0 "
                                "for the sampled tokens' log-probabilities", param="logprobs")
        return self.logprobs is not None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def wants_logprobs(self) -> bool:
        if self.top_logprobs:
            raise APIError(400, f"top_logprobs={self.top_logprobs}: the top alternatives are not supported; use "
                                "logprobs=true alone for the sampled tokens' log-probabilities", param="top_logprobs")
        return self.logprobs


# ---------------------------------------------------------------------------- app
def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine` under the model id `model_name`."""
    scheduler = Scheduler(engine)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(status_code=exc.status_code, content=error_body(message, code=str(exc.status_code)))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(status_code=500, content=error_body(f"internal error: {exc}", "server_error"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest, model_name)
        prompts = _prompt_list(req.prompt)
        ids = [engine.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        logprobs = req.wants_logprobs()
        seqs = _submit(scheduler, engine, ids, req, max_tokens, param="prompt", logprobs=logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}

        def choice(i: int, text: str, finish: str | None, tokens: slice) -> dict:
            lp = _completion_logprobs(engine, seqs[i], tokens) if logprobs else None
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

        if req.stream:
            async def chunks() -> AsyncIterator[dict]:
                async for i, delta, finish, tokens in _events(scheduler, seqs):
                    if delta or finish or (logprobs and tokens.stop > tokens.start):
                        yield {**head, "choices": [choice(i, delta, finish, tokens)]}
                if _include_usage(req):
                    yield {**head, "choices": [], "usage": _usage(seqs, req.n)}
            return _sse(chunks())
        await _drain(scheduler, seqs)
        return {**head, "choices": [choice(i, s.text, s.finish_reason, slice(None)) for i, s in enumerate(seqs)],
                "usage": _usage(seqs, req.n)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _parse(request, ChatRequest, model_name)
        if not req.messages:
            raise APIError(400, "messages is empty; send at least one {'role': 'user', 'content': ...}",
                           param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt = engine.tokenizer.apply_chat_template(messages)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        ids = engine.tokenizer.encode(prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(engine.max_len - len(ids), 1)
        logprobs = req.wants_logprobs()
        seqs = _submit(scheduler, engine, [ids], req, max_tokens, param="messages", logprobs=logprobs)

        def chat_logprobs(i: int, tokens: slice) -> dict | None:
            return _chat_logprobs(engine, seqs[i], tokens) if logprobs else None

        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}

        if req.stream:
            async def chunks() -> AsyncIterator[dict]:
                for i in range(len(seqs)):
                    delta = {"role": "assistant", "content": ""}
                    yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}
                async for i, text, finish, tokens in _events(scheduler, seqs):
                    if text or (logprobs and tokens.stop > tokens.start):  # held-back text: its tokens' values
                        yield {**head, "choices": [{"index": i, "delta": {"content": text},
                                                    "logprobs": chat_logprobs(i, tokens), "finish_reason": None}]}
                    if finish:
                        yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                    "finish_reason": finish}]}
                if _include_usage(req):
                    yield {**head, "choices": [], "usage": _usage(seqs, req.n)}
            return _sse(chunks())
        await _drain(scheduler, seqs)
        choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                    "logprobs": chat_logprobs(i, slice(None)), "finish_reason": s.finish_reason}
                   for i, s in enumerate(seqs)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(seqs, req.n)}

    return app


# ---------------------------------------------------------------------------- helpers
async def _parse(request: Request, schema: type[_Request], model_name: str) -> Any:
    """Read and check a JSON body; every problem becomes an APIError naming the field."""
    try:
        raw = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(raw, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(raw).__name__}")
    try:
        req = schema.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"{param}: {err['msg']}", param=param.split(".")[0]) from None
    if req.model != model_name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            raise APIError(400, f"{name}={value!r} is not supported by this server; leave it out", param=name)
        if name not in UNSUPPORTED:
            log.warning("ignoring unsupported request field %r", name)
    return req


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    """A completions `prompt` (text, texts, token ids, lists of ids) as a list of prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or any(len(p) == 0 for p in prompt):
        raise APIError(400, "prompt is empty; send at least one non-empty prompt", param="prompt")
    return prompt


def _submit(scheduler: Scheduler, engine: Engine, prompts: list[list[int]], req: _Request, max_tokens: int,
            param: str, logprobs: bool = False) -> list[Sequence]:
    """Check the settings, then queue n sequences per prompt (in that order), all reporting to one new
    `_Bridge`. The engine checks each prompt and the token budget (`Engine.sequence`)."""
    if not 1 <= req.n <= 64:
        raise APIError(400, f"n={req.n}: must lie in 1..64", param="n")
    if max_tokens < 1:
        raise APIError(400, f"max_tokens={max_tokens}: must be >= 1", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    params = []
    for i in range(req.n):
        try:
            params.append(SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, max_new_tokens=max_tokens,
                stop=tuple(stop), seed=None if req.seed is None else req.seed + i, logprobs=logprobs))
        except ValueError as e:
            name = str(e).split("=")[0]
            raise APIError(400, str(e), param=name if name in _Request.model_fields else None) from None
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


def _token_texts(engine: Engine, seq: Sequence, tokens: slice) -> tuple[list[str], list[float]]:
    ids = seq.token_ids[tokens]
    return [engine.tokenizer.decode([t]) for t in ids], seq.logprobs[tokens]


def _completion_logprobs(engine: Engine, seq: Sequence, tokens: slice) -> dict:
    """The legacy completions `logprobs` object for the generated tokens in `tokens`."""
    texts, values = _token_texts(engine, seq, tokens)
    offsets, at = [], sum(len(engine.tokenizer.decode([t])) for t in seq.token_ids[: tokens.start or 0])
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


async def _events(scheduler: Scheduler, seqs: list[Sequence]) -> AsyncIterator[tuple[int, str, str | None, slice]]:
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
                raise APIError(500, f"generation {finish}: {seq.error or 'the server is shutting down'}",
                               type_="server_error")
            left -= finish is not None
            i = index[id(seq)]
            tokens, seen[i] = slice(seen[i], n_tokens), n_tokens
            yield i, delta, finish, tokens
    finally:
        for s in seqs:
            if not s.finished:
                scheduler.cancel(s)


async def _drain(scheduler: Scheduler, seqs: list[Sequence]) -> None:
    async for _ in _events(scheduler, seqs):
        pass


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


def _include_usage(req: _Request) -> bool:
    return bool(req.stream_options and req.stream_options.get("include_usage"))


def _usage(seqs: list[Sequence], n: int) -> dict:
    """Token counts; a prompt counts once however many choices (n) it has."""
    prompt = sum(len(s.prompt_ids) for s in seqs[::n])
    completion = sum(len(s.token_ids) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
