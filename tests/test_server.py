"""The OpenAI-compatible server, started for real (uvicorn on 127.0.0.1) and driven by the `openai` client."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from test_infer_fixtures import single_thread, write_tiny_ckpt

import nanoseek
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.server import create_app

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    return write_tiny_ckpt(tmp_path_factory.mktemp("ckpt"))

MAX_LEN = 512


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    """(base_url, engine, scheduler): a server on a free port for the module, shut down cleanly afterwards."""
    engine = Engine(nanoseek.load_pretrained(tiny_ckpt), load_tokenizer(tiny_ckpt), max_batch_size=4,
                    max_len=MAX_LEN)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(engine, "tiny")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine, app.state.scheduler
    server.should_exit = True
    thread.join(30)
    assert not thread.is_alive(), "server did not shut down"
    sock.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def solo(engine: Engine, prompt: str, max_tokens: int) -> str:
    """The greedy answer of the engine alone (no server, no other requests)."""
    return engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=max_tokens))[0].text


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_and_stream(client, served):
    engine = served[1]
    prompt = "The quick brown fox"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert out.choices[0].text == solo(engine, prompt, 20)
    assert out.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(engine.tokenizer.encode(prompt))
    assert out.usage.prompt_tokens == n_prompt and 1 <= out.usage.completion_tokens <= 20
    assert out.usage.total_tokens == n_prompt + out.usage.completion_tokens
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_chat_and_stream(client, served):
    engine = served[1]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 3 + 4?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    expected = solo(engine, engine.tokenizer.apply_chat_template(messages), 24)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_sampling_fields(client):
    many = client.completions.create(model="tiny", prompt="Pack my", max_tokens=12, temperature=1.0, seed=3, n=3)
    again = client.completions.create(model="tiny", prompt="Pack my", max_tokens=12, temperature=1.0, seed=3, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    assert len({c.text for c in many.choices}) > 1  # choice i uses seed + i
    full = client.completions.create(model="tiny", prompt="Pack my", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model="tiny", prompt="Pack my", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs_of_the_sampled_tokens(client, served):
    """completions logprobs=0 and chat logprobs=true return the engine's log p of each generated token
    (streamed too); the top alternatives are refused with a 400 that names the field."""
    engine = served[1]
    prompt = "Pack my box"
    want = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10, logprobs=True))[0]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=0)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    # one string per token (a token ending inside a UTF-8 character shows as U+FFFD on its own)
    assert lp.tokens == [engine.tokenizer.decode([t]) for t in want.token_ids] and lp.text_offset[0] == 0
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                            stream=True))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(want.logprobs, abs=1e-5)
    messages = [{"role": "user", "content": "hi"}]
    chat_want = engine.generate([engine.tokenizer.apply_chat_template(messages)],
                                SamplingParams(temperature=0, max_new_tokens=6, logprobs=True))[0]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True)
    assert [t.logprob for t in chat.choices[0].logprobs.content] == pytest.approx(chat_want.logprobs, abs=1e-5)
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    for call, param in [
        (lambda: client.completions.create(model="tiny", prompt=prompt, max_tokens=4, logprobs=2), "logprobs"),
        (lambda: client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, logprobs=True,
                                                top_logprobs=3), "top_logprobs"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["param"] == param


def test_extreme_filters_are_clamped_not_fatal(client):
    """top_p of 1e-46 (0 in fp32) and top_k of 2**63 keep their meaning (the top token; every token)."""
    greedy = client.completions.create(model="tiny", prompt="Pack my", max_tokens=8, temperature=0).choices[0].text
    tight = client.completions.create(model="tiny", prompt="Pack my", max_tokens=8, temperature=1.0, top_p=1e-46)
    assert tight.choices[0].text == greedy
    wide = client.completions.create(model="tiny", prompt="Pack my", max_tokens=8, temperature=1.0, seed=1,
                                     extra_body={"top_k": 2**63})
    assert wide.choices[0].finish_reason in ("stop", "length")


def test_n_choices_share_one_prefill(client, served):
    stats = served[2].stats
    before = stats.prompt_tokens
    out = client.completions.create(model="tiny", prompt=[1, 2, 3, 4, 5, 6], max_tokens=4, temperature=1.0, seed=1,
                                    n=4)
    assert len(out.choices) == 4 and out.usage.prompt_tokens == 6
    assert stats.prompt_tokens - before == 6  # one prefill for the four rows


def test_concurrent_clients_match_solo_outputs(client, served):
    """Six clients at once (more than the 4 rows, half streaming) each get their solo greedy output."""
    engine = served[1]
    jobs = [("The quick", 30), ("Pack my box with", 9), ("User: what", 25), ("Une phrase", 14),
            ("12 + 34 =", 20), ("sphinx of black", 5)]
    expected = [solo(engine, p, n) for p, n in jobs]
    stats = served[2].stats
    steps, tokens = stats.steps, stats.new_tokens
    results: dict[int, str] = {}

    def run(i: int) -> None:
        prompt, n = jobs[i]
        if i % 2:
            stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)
        else:
            results[i] = client.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                                   temperature=0).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(jobs))] == expected
    assert stats.steps - steps < stats.new_tokens - tokens  # steps served several requests at once


def test_client_disconnect_cancels_the_request(served):
    stats = served[2].stats
    body = {"model": "tiny", "prompt": "The quick", "max_tokens": 400, "temperature": 0, "stream": True}
    before = stats.new_tokens
    with httpx.Client(base_url=served[0], timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert next(r.iter_lines()).startswith("data: ")
    time.sleep(0.5)
    settled = stats.new_tokens
    time.sleep(0.2)
    assert stats.new_tokens == settled and settled - before < 400  # decoding stopped early


@pytest.mark.parametrize("call, status, param", [
    (lambda c: c.completions.create(model="nope", prompt="hi", max_tokens=4), 404, "model"),
    (lambda c: c.completions.create(model="tiny", prompt="hi", max_tokens=MAX_LEN), 400, "max_tokens"),
    (lambda c: c.completions.create(model="tiny", prompt="hi", temperature=-1), 400, "temperature"),
    (lambda c: c.completions.create(model="tiny", prompt="hi", temperature=1e-45), 400, "temperature"),
    (lambda c: c.completions.create(model="tiny", prompt="", max_tokens=4), 400, "prompt"),
    (lambda c: c.completions.create(model="tiny", prompt="hi", max_tokens=4, logprobs=2), 400, "logprobs"),
    (lambda c: c.chat.completions.create(model="tiny", messages=[], max_tokens=4), 400, "messages"),
    (lambda c: c.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}]), 400,
     "messages"),
])
def test_bad_requests_get_openai_errors(client, call, status, param):
    with pytest.raises(openai.APIStatusError) as info:
        call(client)
    assert info.value.status_code == status
    assert info.value.body["param"] == param and info.value.body["message"]
    assert client.models.list().data  # still serving


def test_malformed_bodies(served):
    url = served[0]
    cases = [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/chat/completions", json.dumps({"model": "tiny"}).encode(), 400, "messages"),
        ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}).encode(), 400,
         "max_tokens"),
    ]
    with httpx.Client(base_url=url, timeout=30) as http:
        for path, body, status, param in cases:
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (path, body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
        r = http.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
        assert http.get("/health").json() == {"status": "ok"}
