"""The server's reliability guarantees (issue 20, docs/reliability.md): limits, clear 4xx errors for
client mistakes, 500s without internals, access checks, work off the event loop, abandoned requests
cancelled, concurrent streams equal to solo runs, BOS as transformers adds it."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import openai
import pytest
from server_fixtures import running
from test_infer_fixtures import single_thread, write_tiny_ckpt

import nanoseek
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.protocol import Limits
from nanoseek.infer.server import create_app

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)
MAX_LEN = 256
LIMITS = Limits(max_body_bytes=64_000, max_json_depth=12, max_prompt_chars=5_000, max_prompt_tokens=100,
                max_prompts=4, max_n=8, max_sequences=16, max_messages=8, max_stop=3, max_stop_chars=10)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    return write_tiny_ckpt(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def engine(tiny_ckpt) -> Engine:
    return Engine(nanoseek.load_pretrained(tiny_ckpt), load_tokenizer(tiny_ckpt), max_batch_size=8, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def served(engine):
    """(base_url, app) with the small LIMITS above."""
    app = create_app(engine, "tiny", LIMITS)
    with running(app) as url:
        yield url, app


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[0], timeout=60) as client:
        yield client


def post(http: httpx.Client, body, path: str = "/v1/completions", **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers={"content-type": "application/json", **headers})


def good(**fields) -> dict:
    return {"model": "tiny", "prompt": "Pack my", "max_tokens": 6, "temperature": 0, **fields}


SYSTEM = {"role": "system", "content": "Be brief."}  # the default R1 system prompt alone outgrows MAX_LEN


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": [SYSTEM, {"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


# ---------------------------------------------------------------------------- limits
@pytest.mark.parametrize("body, path, status, code", [
    (good(prompt="x" * 70_000), "/v1/completions", 413, "max_body_bytes"),
    (good(prompt="x" * 5_001), "/v1/completions", 400, "max_prompt_chars"),
    (good(prompt="x" * 3_500), "/v1/completions", 400, "context_length_exceeded"),  # > 2 x 100 tokens x 15 chars
    (good(prompt=[5] * 101), "/v1/completions", 400, "context_length_exceeded"),  # max_prompt_tokens
    (good(prompt=["a"] * 5), "/v1/completions", 400, "max_prompts"),
    (good(n=9), "/v1/completions", 400, "max_n"),
    (good(prompt=["a", "b", "c"], n=6), "/v1/completions", 400, "max_sequences"),
    (good(stop=["a", "b", "c", "d"]), "/v1/completions", 400, "max_stop"),
    (good(stop="x" * 11), "/v1/completions", 400, "max_stop_chars"),
    (chat(messages=[{"role": "user", "content": "hi"}] * 9), "/v1/chat/completions", 400, "max_messages"),
    (chat(messages=[{"role": "user", "content": "y" * 5_000}]), "/v1/chat/completions", 400, "max_prompt_chars"),
    (good(extra=[[[[[[[[[[[[[1]]]]]]]]]]]]]), "/v1/completions", 400, "max_json_depth"),
    (b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "/v1/completions", 400, "max_json_depth"),
])
def test_each_limit_is_a_clear_error(http, body, path, status, code):
    r = post(http, body, path)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    if code == "context_length_exceeded":  # max_prompt_tokens, or more characters than any 100 tokens can hold
        assert "max_prompt_tokens" in err["message"] or "more than the context can hold" in err["message"]
    else:
        assert code in err["message"] and Limits.flag(code) in err["message"]


def test_a_chunked_body_is_counted_as_it_arrives(http):
    """No Content-Length: the body is cut off at the limit while it is read."""
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'
    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "max_body_bytes"


def test_limits_are_checked_and_default_sensibly():
    d = Limits()
    assert d.max_body_bytes >= 4 * d.max_prompt_chars // 4 and d.max_sequences >= d.max_n
    with pytest.raises(ValueError, match="max_n=0"):
        Limits(max_n=0)


# ---------------------------------------------------------------------------- client mistakes are 400s
@pytest.mark.parametrize("body, param", [
    (b'{"model": "tiny", "prompt": "\\ud800 lone"}', "prompt"),                # escaped lone surrogate
    (b'{"model": "tiny", "prompt": "\xed\xa0\x80 raw"}', "prompt"),            # the same as raw bytes
    (b'{"model": "tiny", "prompt": "\xff\xfe bad"}', None),                     # not UTF-8 at all
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"model": "tiny", "prompt": "x", "top_p": 1e400}', "top_p"),
    (json.dumps(good(seed=2**70)).encode(), "seed"),
    (json.dumps(good(max_tokens=10**30)).encode(), "max_tokens"),
    (json.dumps(good(prompt=[10**30])).encode(), "prompt"),
    (json.dumps(good(prompt=[-1, 2])).encode(), "prompt"),
    (json.dumps(good(stop=[""])).encode(), "stop"),
])
def test_bad_values_are_400s(http, body, param):
    r = post(http, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "text", "text": 123}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": {"text": "x"}}],
    [{"role": "user", "content": "\ud800"}],
    "hi",
])
def test_bad_messages_are_400s_naming_messages(http, messages):
    r = post(http, chat(messages=messages), "/v1/chat/completions")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"


def test_text_parts_are_joined(http, engine):
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "3 + 4?"}]
    a = post(http, chat(messages=[SYSTEM, {"role": "user", "content": parts}], temperature=0), "/v1/chat/completions")
    b = post(http, chat(messages=[SYSTEM, {"role": "user", "content": "What is 3 + 4?"}], temperature=0),
             "/v1/chat/completions")
    assert a.status_code == 200 and a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]


def test_a_500_does_not_echo_internals(http, engine, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")
    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", broken)
    with caplog.at_level(logging.ERROR, logger="nanoseek.infer.server"):
        r = post(http, chat(), "/v1/chat/completions")
    assert r.status_code == 500
    err = r.json()["error"]
    assert "secret" not in r.text and err["type"] == "server_error" and "request" in err["message"]
    assert "secret internal detail" in caplog.text  # the log has it


def test_405_keeps_allow_and_models_by_id(http):
    r = http.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()
    assert http.get("/v1/models/tiny").json()["id"] == "tiny"
    r = http.get("/v1/models/other/name")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_openapi_declares_the_request_bodies(served):
    schema = served[1].openapi()
    text = json.dumps(schema)
    assert "$defs" not in text  # every reference inlined
    for path, field in [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")]:
        body = schema["paths"][path]["post"]["requestBody"]
        props = body["content"]["application/json"]["schema"]["properties"]
        assert body["required"] and field in props and "model" in props
    roles = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert "developer" in json.dumps(roles)


def test_user_field_accepted_and_unknown_fields_logged_once(http, caplog):
    with caplog.at_level(logging.WARNING, logger="nanoseek.infer.server"):
        for _ in range(3):
            r = post(http, good(user="alice", some_vendor_field=1, other_field="x"))
            assert r.status_code == 200
    lines = [r.getMessage() for r in caplog.records if "unsupported request field" in r.getMessage()]
    assert sorted(lines) == sorted(f"ignoring unsupported request field {n!r} (logged once)"
                                   for n in ("some_vendor_field", "other_field"))


# ---------------------------------------------------------------------------- access
def test_content_type_must_be_json(http):
    body = json.dumps(good()).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", ""):
        r = http.post("/v1/completions", content=body, headers={"content-type": ctype})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_api_key_and_allowed_hosts(engine, monkeypatch):
    app = create_app(engine, "tiny", api_key="s3cret", allowed_hosts=["localhost", "127.0.0.1"])
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").status_code == 200  # open
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = http.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="tiny", prompt="Pack", max_tokens=2).choices
        r = http.get("/v1/models", headers={"authorization": "Bearer s3cret", "host": "evil.example:80"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
        r = http.get("/v1/models", headers={"authorization": "Bearer s3cret", "host": "LOCALHOST:8000"})
        assert r.status_code == 200


# ---------------------------------------------------------------------------- the event loop and abandoned work
def test_tokenizing_runs_off_the_event_loop(served, engine, monkeypatch):
    """A slow tokenization (1 s, blocking) does not stall other requests."""
    real = engine.tokenizer.encode_prompt

    def slow(text):
        time.sleep(1.0)
        return real(text)
    monkeypatch.setattr(engine.tokenizer, "encode_prompt", slow)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (httpx.post(served[0] + "/v1/completions", json=good(), timeout=60),
                                              done.set()))
    worker.start()
    time.sleep(0.2)
    start = time.monotonic()
    assert httpx.get(served[0] + "/health", timeout=60).status_code == 200
    assert time.monotonic() - start < 0.5 and not done.is_set()
    worker.join(60)


def test_an_abandoned_non_streaming_request_is_cancelled(served):
    stats = served[1].state.scheduler.stats
    before = stats.new_tokens
    body = good(prompt="The quick", max_tokens=MAX_LEN - 10)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served[0] + "/v1/completions", json=body, timeout=0.3)  # the client gives up and closes
    time.sleep(0.5)
    settled = stats.new_tokens
    time.sleep(0.3)
    assert stats.new_tokens == settled and settled - before < MAX_LEN - 10  # decoding stopped early


# ---------------------------------------------------------------------------- isolation
def test_64_concurrent_streams_equal_their_solo_runs(served, engine):
    prompts = [f"{word} {i}" for i, word in enumerate(["The quick", "Pack my", "sphinx", "12 + 34"] * 16)]
    lengths = [4 + i % 9 for i in range(64)]
    solo = [engine.generate([p], SamplingParams(temperature=0, max_new_tokens=n))[0].text
            for p, n in zip(prompts, lengths)]

    async def stream(client: httpx.AsyncClient, prompt: str, n: int) -> str:
        text = []
        async with client.stream("POST", "/v1/completions", json=good(prompt=prompt, max_tokens=n, stream=True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(text)

    async def all_streams() -> list[str]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=served[0], timeout=120, limits=limits) as client:
            return await asyncio.gather(*(stream(client, p, n) for p, n in zip(prompts, lengths)))

    assert asyncio.run(all_streams()) == solo


# ---------------------------------------------------------------------------- BOS
def test_raw_prompts_get_the_tokenizers_bos_as_in_transformers(tiny_ckpt, tmp_path):
    """A tokenizer whose post-processor adds BOS: encode_prompt matches transformers, and the server's
    /v1/completions decodes from exactly those ids."""
    transformers = pytest.importorskip("transformers")
    import shutil

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors
    folder = tmp_path / "bos"
    shutil.copytree(tiny_ckpt, folder)
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    hf.post_processor = processors.TemplateProcessing(single="<|end_of_text|> $A",
                                                      special_tokens=[("<|end_of_text|>", 0)])
    hf.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|end_of_text|>"}))
    tok = load_tokenizer(folder)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in ["Pack my box", "Une phrase é", "  spaces", "<think> 7"]:
        assert tok.encode_prompt(text) == reference(text).input_ids
        assert tok.encode_prompt(text)[0] == 0 and tok.encode_prompt(text)[1:] == tok.encode(text)
    engine = Engine(nanoseek.load_pretrained(str(folder)), tok, max_batch_size=2, max_len=MAX_LEN)
    want = engine.generate([tok.encode_prompt("Pack my")], SamplingParams(temperature=0, max_new_tokens=8))[0]
    with running(create_app(engine, "bos")) as url:
        out = httpx.post(url + "/v1/completions", json={"model": "bos", "prompt": "Pack my", "max_tokens": 8,
                                                        "temperature": 0}, timeout=60).json()
    assert out["usage"]["prompt_tokens"] == len(tok.encode("Pack my")) + 1
    assert out["choices"][0]["text"] == want.text


def test_streamed_text_offsets_equal_the_whole_answers(http):
    """Completions logprobs' text_offset continues across stream chunks (kept per choice, not recounted)."""
    whole = post(http, good(max_tokens=12, logprobs=0, n=2, temperature=1.0, seed=5)).json()
    r = post(http, good(max_tokens=12, logprobs=0, n=2, temperature=1.0, seed=5, stream=True))
    streamed: dict[int, list[int]] = {0: [], 1: []}
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                if c["logprobs"]:
                    streamed[c["index"]] += c["logprobs"]["text_offset"]
    for c in whole["choices"]:
        offsets = c["logprobs"]["text_offset"]
        assert streamed[c["index"]] == offsets and len(offsets) > 1


def test_an_app_serves_again_after_a_restart(engine):
    app = create_app(engine, "tiny")
    for _ in range(2):  # the lifespan makes (and ends) the scheduler thread and the worker pool each time
        with running(app) as url:
            r = httpx.post(url + "/v1/completions", json=good(max_tokens=2), timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_a_full_queue_is_a_429_naming_the_limit(http, served, monkeypatch):
    scheduler = served[1].state.scheduler
    monkeypatch.setattr(type(scheduler), "waiting", property(lambda self: 4095))  # one place left (default 4096)
    assert post(http, good()).status_code == 200
    r = post(http, good(n=2))
    assert r.status_code == 429 and r.json()["error"]["code"] == "max_waiting" and "--max-waiting" in r.text
    assert scheduler.waiting == 4095  # nothing was queued
