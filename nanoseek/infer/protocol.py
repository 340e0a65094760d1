"""The server's request side: limits, request bodies, parsing and checking (no model work here).

    limits = Limits(max_body_bytes=2**20)                # every bound a request must stay within
    req = parse_request(body, CompletionRequest, limits, unknown_fields)   # bytes -> checked model, or APIError

A request is checked before it costs anything: its size (413), its JSON (depth, finite numbers,
strings that are valid Unicode), its fields (types, roles, content parts) and the limits on
prompts, choices and stop strings (400). Each error names the field or the limit, and the fix.
`parse_request` is plain, synchronous Python: the server runs it on a worker thread, off the
event loop. The unknown-field log says each name once per server, not once per request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger("nanoseek.infer.server")

# Fields that would change the output if honoured: refused unless they hold their neutral value.
UNSUPPORTED = {"echo": (None, False),
               "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"})}
MAX_LOGGED_UNKNOWN = 100  # distinct unknown field names logged at most (then one line saying so)


def _limit(default: int, help_: str) -> Any:
    return field(default=default, metadata={"help": help_})


@dataclass(frozen=True)
class Limits:
    """Bounds on one request, each answered with a 400 (413 for the body, 429 for the queue) that names it.

    The defaults let every legitimate request of a single-node server through (a prompt of a
    128k-token context is about 512k characters) while keeping one request from stalling or
    starving the others. `nanoseek serve --max-body-bytes N ...` sets each one.
    """

    max_body_bytes: int = _limit(4 * 2**20, "request body size in bytes (413 beyond)")
    max_json_depth: int = _limit(32, "nesting depth of the JSON body")
    max_prompt_chars: int = _limit(1_000_000, "characters of one prompt (chat: of the rendered conversation), "
                                   "checked before tokenizing")
    max_prompt_tokens: int = _limit(0, "tokens of one prompt (0: the context, max-len - 1)")
    max_prompts: int = _limit(64, "prompts in one completions request")
    max_n: int = _limit(64, "choices (n) per prompt")
    max_sequences: int = _limit(256, "prompts x n of one request")
    max_messages: int = _limit(1024, "chat messages in one request")
    max_stop: int = _limit(16, "stop strings in one request")
    max_stop_chars: int = _limit(256, "characters of one stop string")
    max_waiting: int = _limit(4096, "sequences queued for a batch row, all requests together (429 beyond)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, low = getattr(self, f.name), 0 if f.name == "max_prompt_tokens" else 1
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{f.name}={value!r}: must be an integer >= {low}")

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=self.headers,
                            content=error_body(self.message, self.type, self.param, self.code))


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def limit_error(name: str, what: str, param: str | None = None, status: int = 400) -> APIError:
    """`what` broke the limit `name`: say so, with the flag that raises it."""
    return APIError(status, f"{what}; the server's limit is {name} (raise it with nanoseek serve "
                            f"{Limits.flag(name)})", param=param, code=name)


# ---------------------------------------------------------------------------- request bodies
class OpenAIRequest(BaseModel):
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
    user: str | None = None  # OpenAI's end-user id: accepted and written to the request log line


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # 0: the sampled tokens' log-probabilities; more: top alternatives (refused)

    def wants_logprobs(self) -> bool:
        if self.logprobs is not None and self.logprobs != 0:
            raise APIError(400, f"logprobs={self.logprobs}: the top alternatives are not supported; use logprobs=0 "
                                "for the sampled tokens' log-probabilities", param="logprobs")
        return self.logprobs is not None


class TextPart(BaseModel):
    """One part of a message's content; only text parts exist for a text-only model."""
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(OpenAIRequest):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def wants_logprobs(self) -> bool:
        if self.top_logprobs:
            raise APIError(400, f"top_logprobs={self.top_logprobs}: the top alternatives are not supported; use "
                                "logprobs=true alone for the sampled tokens' log-probabilities", param="top_logprobs")
        return self.logprobs


# ---------------------------------------------------------------------------- parsing
def parse_request(body: bytes, schema: type[OpenAIRequest], limits: Limits, unknown: set[str]) -> Any:
    """Bytes of a JSON body -> a checked `schema` instance; every problem an APIError naming it.

    unknown: the unknown field names logged so far (updated here, so each is logged once).
    """
    if len(body) > limits.max_body_bytes:
        raise limit_error("max_body_bytes", f"the body has {len(body):,} bytes", status=413)
    try:
        raw = json.loads(body)
    except RecursionError:
        raise limit_error("max_json_depth", "the JSON body nests too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(raw, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(raw).__name__}")
    check_json(raw, limits.max_json_depth)
    try:
        req = schema.model_validate(raw)
    except ValidationError as e:
        raise validation_error(e) from None
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            raise APIError(400, f"{name}={value!r} is not supported by this server; leave it out", param=name)
        if name not in UNSUPPORTED and name not in unknown and len(unknown) <= MAX_LOGGED_UNKNOWN:
            unknown.add(name)  # a set shared by the worker threads: add is atomic under the GIL
            if len(unknown) > MAX_LOGGED_UNKNOWN:
                log.warning("more than %d distinct unknown request fields; no longer logging them", MAX_LOGGED_UNKNOWN)
            else:
                log.warning("ignoring unsupported request field %r (logged once)", name[:100])
    return req


def check_json(value: Any, max_depth: int) -> None:
    """Walk a parsed body (iteratively): nesting within max_depth, finite numbers, and strings
    that are valid Unicode (JSON's \\ud800 escapes parse to lone surrogates, which no tokenizer
    can encode)."""
    stack: list[tuple[Any, tuple, int]] = [(value, (), 1)]
    while stack:
        v, path, depth = stack.pop()
        where = ".".join(map(str, path)) or "the body"
        if isinstance(v, (dict, list)):
            if depth > max_depth:
                raise limit_error("max_json_depth", f"{where} nests deeper than {max_depth} levels",
                                  param=str(path[0]) if path else None)
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, item in items:
                if isinstance(k, str):
                    _check_text(k, where + " (a key)", path)
                stack.append((item, (*path, k), depth + 1))
        elif isinstance(v, str):
            _check_text(v, where, path)
        elif isinstance(v, float) and not math.isfinite(v):
            raise APIError(400, f"{where}: {v} is not a finite number", param=str(path[0]) if path else None)


def _check_text(s: str, where: str, path: tuple) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{where}: the string holds a lone UTF-16 surrogate (not valid Unicode); "
                            "send valid UTF-8 text", param=str(path[0]) if path else None) from None


def validation_error(e: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the field (union branches such as `str`/`list[int]` left
    out of the path), with up to three of its problems; a field of several allowed shapes says which."""
    problems, param = [], None
    for err in e.errors():
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))]
        param = param or (loc[0] if loc else None)
        field = next((i for i, x in enumerate(loc) if x in SHAPES and (i == 0 or x == "content")), None)
        if field is not None:  # one line for the field, not one per union branch
            problems.append(f"{'.'.join(loc[:field + 1])}: {SHAPES[loc[field]]}")
        else:
            problems.append(f"{'.'.join(loc)}: {err['msg']}" if loc else err["msg"])
    problems = list(dict.fromkeys(problems))
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return APIError(400, "; ".join(problems[:3]) + more, param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "TextPart", "function-after"}
SHAPES = {"prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
          "stop": "must be a string or a list of strings",
          "content": "must be a string or a list of {'type': 'text', 'text': '...'} parts"}


def check_limits(req: OpenAIRequest, limits: Limits, n_prompts: int) -> list[str]:
    """The request's counts against the limits; returns its stop strings as a list."""
    if not 1 <= req.n <= limits.max_n:
        raise APIError(400, f"n={req.n}: must lie in 1..{limits.max_n} (limit max_n, nanoseek serve --max-n)",
                       param="n", code="max_n" if req.n > limits.max_n else None)
    if n_prompts > limits.max_prompts:
        raise limit_error("max_prompts", f"the request has {n_prompts} prompts", param="prompt")
    if n_prompts * req.n > limits.max_sequences:
        raise limit_error("max_sequences", f"{n_prompts} prompts x n={req.n} make {n_prompts * req.n} sequences",
                          param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stop:
        raise limit_error("max_stop", f"stop has {len(stop)} strings", param="stop")
    longest = max(map(len, stop), default=0)
    if longest > limits.max_stop_chars:
        raise limit_error("max_stop_chars", f"a stop string has {longest} characters", param="stop")
    if isinstance(req, ChatRequest) and len(req.messages) > limits.max_messages:
        raise limit_error("max_messages", f"the request has {len(req.messages)} messages", param="messages")
    return stop


def prompt_list(prompt: Any) -> list[str | list[int]]:
    """A completions `prompt` (text, texts, token ids, lists of ids) as a list of prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or any(len(p) == 0 for p in prompt):
        raise APIError(400, "prompt is empty; send at least one non-empty prompt", param="prompt")
    return prompt


def check_prompt_chars(text: str, limits: Limits, param: str, fits: int | None = None) -> None:
    """Before tokenizing: the text within max_prompt_chars and, if given, within `fits`, the most
    characters that can still encode to a prompt that fits the context."""
    if len(text) > limits.max_prompt_chars:
        raise limit_error("max_prompt_chars", f"the {param} has {len(text):,} characters", param=param)
    if fits is not None and len(text) > fits:
        raise APIError(400, f"the {param} has {len(text):,} characters: more than the context can hold, whatever "
                            f"they encode to (at most {fits:,}); shorten it", param=param,
                       code="context_length_exceeded")


def release_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps what a thread freed in its arena: one
    tokenization of a 1 MB prompt holds on to ~100 MB per worker thread otherwise."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl, Windows): nothing to trim
        return None


_LIBC = _libc()
BIG_REQUEST = 256 * 1024  # bytes of body after which the worker trims the heap


def check_prompt_tokens(ids: list[int], limits: Limits, max_len: int, param: str) -> None:
    cap = limits.max_prompt_tokens or max_len - 1
    if len(ids) > cap:
        name = "max_prompt_tokens"
        raise APIError(400, f"the {param} has {len(ids):,} tokens; at most {cap:,} fit (limit {name}"
                            f"{'' if limits.max_prompt_tokens else ': the context minus one new token'}; "
                            f"nanoseek serve {Limits.flag(name)} or --max-len)", param=param,
                       code="context_length_exceeded")
