"""Fuzz the OpenAI-compatible server with malformed and hostile requests (issue 20's acceptance).

    python bench/server_fuzz.py                                  # 1,000 requests, a tiny random model served
                                                                 # by `nanoseek serve` in a subprocess
    python bench/server_fuzz.py --requests 5000 --seed 1
    python bench/server_fuzz.py --device cuda                    # on a GPU, CUDA graphs on
    python bench/server_fuzz.py --url http://127.0.0.1:8000 --model demo   # a server you started (no RSS)

Requests are drawn (seeded) from families: malformed JSON, wrong types in every field, extreme
numbers (1e400, NaN, 2**64, 1e-45, ...), invalid UTF-8 and lone surrogates, deep nesting, huge
bodies and lists, wrong roles and content parts, wrong methods / paths / content types, and valid
requests (streaming or not) with odd but legal settings. Pass: no 5xx, no hang (a response within
`--timeout`), every error in OpenAI's `{"error": {...}}` shape, a good greedy request answered
identically before and after, and the server's RSS back within 20% of its start (measured after
a warm-up request). `tests/test_server_fuzz.py` runs a few hundred of these in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

Case = tuple[str, str, str, str, bytes]  # (family, method, path, content type, body)
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
EXTREME = [0, -1, 1e-45, 1e-40, -0.0, 1e308, -1e308, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 0.5, 7, True]
RAW_NUMBERS = [b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"1" * 400, b"0.0000001e-400"]
WRONG = [None, "x", "", [], [1], {}, {"a": 1}, True, 3.5, -7, [[1, 2]], ["a", 1]]
STRINGS = ["\ud800", "\udfff x", "a\ud800b", "\x00\x01", "é🙂", "\u202e", "<|end_of_text|>", "x" * 5000]
RAW_BYTES = [b"\xed\xa0\x80", b"\xff\xfe", b"\xc0\x80", b"\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]
ROLES = ["tool", "function", "", "SYSTEM", "robot", 123, None, ["user"], {"r": 1}]


def good_completion(model: str, **fields) -> dict:
    return {"model": model, "prompt": "The quick", "max_tokens": 8, "temperature": 0, **fields}


def good_chat(model: str, **fields) -> dict:
    return {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "What is 3 + 4?"}],
            "max_tokens": 8, "temperature": 0, **fields}


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


def _post(family: str, path: str, body: bytes | dict) -> Case:
    return family, "POST", path, "application/json", body if isinstance(body, bytes) else _json(body)


def cases(rng: random.Random, model: str, huge_bytes: int, only: set[str] | None = None) -> Iterator[Case]:
    """An endless, seeded stream of requests, family by family in random order (only: those
    families, by maker name: malformed, wrong_type, extreme, bad_text, deep, huge, wrong_role,
    protocol, valid)."""
    fields = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
              "logprobs", "stream_options", "user", "echo", "best_of", "logit_bias"]
    chat_fields = ["messages", "max_completion_tokens", "logprobs", "top_logprobs", "n", "stop", "stream"]

    def base(chat: bool) -> tuple[str, dict]:
        return (CHAT, good_chat(model)) if chat else (COMPLETIONS, good_completion(model))

    def malformed() -> Case:
        body = _json(good_completion(model))
        choice = rng.randrange(7)
        raw = [body[: rng.randrange(len(body))], b"{", b"", b"null", b'"text"', b"[1, 2]", body + b" trailing"][choice]
        return _post("malformed_json", rng.choice([COMPLETIONS, CHAT]), raw)

    def wrong_type() -> Case:
        chat = rng.random() < 0.4
        path, body = base(chat)
        body[rng.choice(chat_fields if chat else fields)] = rng.choice(WRONG)
        return _post("wrong_type", path, body)

    def extreme() -> Case:
        path, body = base(rng.random() < 0.3)
        name = rng.choice(["max_tokens", "temperature", "top_p", "top_k", "n", "seed", "logprobs"])
        if rng.random() < 0.3:  # numbers Python's json reads as inf/nan or huge ints
            text = _json({**body, name: 0}).replace(f'"{name}": 0'.encode(), f'"{name}": '.encode()
                                                    + rng.choice(RAW_NUMBERS))
            return _post("extreme_number", path, text)
        body[name] = rng.choice(EXTREME)
        if name in ("max_tokens", "n") and isinstance(body[name], (int, float)) and 0 < body[name] <= 64:
            body["max_tokens"] = min(int(body.get("max_tokens", 8)), 8)
        return _post("extreme_number", path, body)

    def bad_text() -> Case:
        path, body = base(rng.random() < 0.4)
        if rng.random() < 0.5:
            s = rng.choice(STRINGS)
            if path == CHAT:
                body["messages"][-1]["content"] = s
            else:
                body[rng.choice(["prompt", "stop", "user", "model"])] = s
            return _post("invalid_unicode", path, _json(body))  # json.dumps writes lone surrogates as \udXXX
        raw = _json(body).replace(b"3 + 4" if path == CHAT else b"The quick", rng.choice(RAW_BYTES))
        return _post("invalid_utf8", path, raw)

    def deep() -> Case:
        depth = rng.choice([40, 200, 1000, 5000, 50_000])
        where = rng.choice(["prompt", "extra", "stop", "content"])
        nest = b"[" * depth + b"1" + b"]" * depth
        if where == "content":
            raw = b'{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (model.encode(), nest)
            return _post("deep_nesting", CHAT, raw)
        raw = b'{"model": "%s", "prompt": "x", "max_tokens": 2, "%s": %s}' % (model.encode(), where.encode(), nest)
        if where == "prompt":
            raw = b'{"model": "%s", "prompt": %s}' % (model.encode(), nest)
        return _post("deep_nesting", COMPLETIONS, raw)

    def huge() -> Case:
        kind = rng.randrange(6)
        if kind == 0:
            return _post("huge", COMPLETIONS, good_completion(model, prompt="x" * huge_bytes))
        if kind == 1:
            return _post("huge", COMPLETIONS, good_completion(model, prompt=["ab"] * rng.choice([65, 1000, 20_000])))
        if kind == 2:
            return _post("huge", COMPLETIONS, good_completion(model, n=rng.choice([65, 10**6]), prompt=["a"] * 50))
        if kind == 3:
            return _post("huge", COMPLETIONS, good_completion(model, stop=["s" * 1000] * 1000))
        if kind == 4:
            messages = [{"role": "user", "content": "hi"}] * rng.choice([1025, 20_000])
            return _post("huge", CHAT, good_chat(model, messages=messages))
        return _post("huge", COMPLETIONS, good_completion(model, prompt="word " * 200_000))

    def wrong_role() -> Case:
        body = good_chat(model)
        kind = rng.randrange(5)
        if kind == 0:
            body["messages"][-1]["role"] = rng.choice(ROLES)
        elif kind == 1:
            del body["messages"][-1]["role"]
        elif kind == 2:
            body["messages"][-1]["content"] = [{"type": "text", "text": rng.choice([123, None, ["x"], "ok"])}]
        elif kind == 3:
            body["messages"][-1]["content"] = [{"type": rng.choice(["image_url", "audio", 5]), "image_url": "x"}]
        else:
            body["messages"] = rng.choice([[], "hi", [None], [1, 2], [{"role": "assistant"}] * 3])
        return _post("wrong_role", CHAT, body)

    def protocol() -> Case:
        kind = rng.randrange(6)
        body = _json(good_completion(model))
        if kind == 0:
            return "protocol", "POST", COMPLETIONS, rng.choice(["text/plain", "", "application/x-www-form-urlencoded",
                                                                "multipart/form-data"]), body
        if kind == 1:
            return "protocol", rng.choice(["GET", "PUT", "DELETE", "PATCH"]), rng.choice([COMPLETIONS, CHAT]), "", b""
        if kind == 2:
            return "protocol", "GET", rng.choice(["/v1/models/" + model, "/v1/models/nope", "/v1/nothing", "/",
                                                  "/v1/models/%ff%fe", "/health", "/openapi.json"]), "", b""
        if kind == 3:
            return _post("protocol", COMPLETIONS, good_completion(rng.choice(["", "nope", model + "x"])))
        if kind == 4:
            return _post("protocol", rng.choice([COMPLETIONS, CHAT]), {f"unknown_field_{rng.randrange(5)}": 1})
        return "protocol", "POST", COMPLETIONS, "application/json; charset=utf-8", body

    def valid() -> Case:
        chat = rng.random() < 0.4
        path, body = base(chat)
        body.update(stream=rng.random() < 0.5, n=rng.choice([1, 2]), max_tokens=rng.choice([1, 4, 8]),
                    temperature=rng.choice([0, 0.7, 1.0, 1e-3, 1e4]), top_p=rng.choice([1.0, 0.9, 1e-46]),
                    top_k=rng.choice([0, 1, 5, 2**63]), seed=rng.choice([None, 0, 2**40]),
                    stop=rng.choice([None, "e", ["x", "y"]]), user=rng.choice([None, "alice"]))
        if rng.random() < 0.3:
            body["stream_options"] = {"include_usage": rng.choice([True, False, "yes", None])}
        if not chat and rng.random() < 0.3:
            body["prompt"] = rng.choice([[5, 6, 7], [[5, 6], [7, 8]], ["a", "b"], [300, 10**9]])
        return _post("valid", path, body)

    families = [(malformed, 2), (wrong_type, 3), (extreme, 3), (bad_text, 2), (deep, 1), (huge, 1),
                (wrong_role, 2), (protocol, 2), (valid, 2)]
    makers = [f for f, w in families for _ in range(w) if only is None or f.__name__ in only]
    while True:
        yield rng.choice(makers)()


def send(http: httpx.Client, case: Case, timeout: float) -> tuple[int | None, str]:
    """(status or None for a hang/transport failure, a problem or ''). Streams are read to the end."""
    family, method, path, ctype, body = case
    headers = {"content-type": ctype} if ctype else {}
    try:
        with http.stream(method, path, content=body or None, headers=headers, timeout=timeout) as r:
            data = b"".join(r.iter_bytes())
    except httpx.TimeoutException:
        return None, "hang"
    except httpx.HTTPError as e:
        return None, f"transport: {type(e).__name__}: {e}"
    if r.status_code >= 400 and path.startswith("/v1"):
        try:
            err = json.loads(data)["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
        except Exception:
            return r.status_code, f"not an OpenAI error body: {data[:200]!r}"
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        if not data.rstrip().endswith(b"data: [DONE]"):
            return r.status_code, "stream did not end with [DONE]"
    return r.status_code, ""


def answers(http: httpx.Client, model: str) -> list:
    """The good requests' greedy answers (compared before and after the fuzz)."""
    out = []
    for path, body in [(COMPLETIONS, good_completion(model)), (CHAT, good_chat(model))]:
        r = http.post(path, json=body, timeout=120)
        r.raise_for_status()
        out.append([c.get("text", c.get("message")) for c in r.json()["choices"]])
    return out


def fuzz(url: str, model: str, requests: int, seed: int = 0, timeout: float = 60.0, concurrency: int = 8,
         huge_bytes: int = 5 * 2**20, rss=None, only: set[str] | None = None, api_key: str | None = None) -> dict:
    """Send `requests` fuzzed requests, `concurrency` at a time; returns the report (see module doc).
    rss: a function giving the server's resident memory in bytes (None: not measured)."""
    stream = cases(random.Random(seed), model, huge_bytes, only)
    batch: list[tuple[str, str, str, bytes]] = []  # (family, method, path, first bytes of the body)
    lock = threading.Lock()

    def one(_: int) -> tuple[int | None, str]:
        with lock:  # made one at a time (the stream is seeded), sent in parallel, kept only as a summary
            case = next(stream)
            batch.append((case[0], case[1], case[2], case[4][:120]))
            at = len(batch) - 1
        return at, send(http, case, timeout)

    auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, limits=httpx.Limits(max_connections=concurrency), headers=auth) as http:
        before = answers(http, model)
        rss_start = rss() if rss else None
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            done = dict(pool.map(one, range(requests)))
        results = [done[i] for i in range(requests)]
        seconds = time.perf_counter() - start
        after = answers(http, model)
        rss_end = rss() if rss else None
    statuses = Counter(str(s) for s, _ in results)
    by_family = Counter(f"{c[0]} {s}" for c, (s, _) in zip(batch, results))
    problems = [(c[0], c[1], c[2], c[3].decode("utf-8", "replace"), s, p)
                for c, (s, p) in zip(batch, results) if p or (s is not None and s >= 500)]
    report = {"requests": requests, "seed": seed, "seconds": round(seconds, 2), "statuses": dict(statuses),
              "by_family": dict(sorted(by_family.items())), "server_errors": sum(s is not None and s >= 500
                                                                                 for s, _ in results),
              "hangs": sum(p == "hang" for _, p in results), "problems": problems[:20],
              "n_problems": len(problems), "identical_before_after": before == after,
              "rss_start_mib": rss_start and round(rss_start / 2**20, 1),
              "rss_end_mib": rss_end and round(rss_end / 2**20, 1)}
    report["rss_within_20pct"] = None if rss is None else rss_end <= 1.2 * rss_start
    report["ok"] = (report["server_errors"] == 0 and report["hangs"] == 0 and not problems
                    and report["identical_before_after"] and report["rss_within_20pct"] is not False)
    return report


def proc_rss(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def tiny_checkpoint(out: Path) -> Path:
    """A random debug-preset model with a small trained tokenizer (what the CPU tests use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import nanoseek
    from nanoseek.config import preset
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model.transformer import Transformer

    texts = ["The quick brown fox jumps over the lazy dog. 12 + 34 = 46.", "Une phrase é à ç 🙂",
             "User: what is 3 + 4?\nAssistant: <think> 7 </think> <answer> 7 </answer>"] * 30
    tok = train_tokenizer(texts, vocab_size=320, out_dir=out)
    nanoseek.save_pretrained(Transformer.from_config(preset("debug", vocab_size=tok.vocab_size), seed=0), out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before it counts as a hang")
    p.add_argument("--url", default=None, help="fuzz a running server instead of starting one")
    p.add_argument("--model", default="tiny", help="model id (with --url)")
    p.add_argument("--api-key", default=None, help="(with --url) the server's key (default: env NANOSEEK_API_KEY)")
    p.add_argument("--ckpt", default=None, help="checkpoint to serve (default: a tiny random one)")
    p.add_argument("--device", default="cpu", help="device of the served model (cuda: CUDA graphs on too)")
    p.add_argument("--out", default=None, help="report JSON (default: bench/results/server_fuzz-<date>.json)")
    args = p.parse_args()
    server = None
    rss = None
    url, model = args.url, args.model
    if url is None:
        tmp = Path(tempfile.mkdtemp(prefix="nanoseek-fuzz-"))
        ckpt = args.ckpt or str(tiny_checkpoint(tmp / "tiny"))
        model = Path(ckpt).name
        port = 18000 + os.getpid() % 1000
        entry = "import sys; from nanoseek.cli import main; sys.exit(main())"  # `nanoseek` without the script
        graphs = ["--cuda-graph"] if args.device.startswith("cuda") else []
        server = subprocess.Popen([sys.executable, "-c", entry, "serve", "--ckpt", ckpt, "--device", args.device,
                                   *graphs, "--max-len", "256", "--port", str(port), "--log-level", "warning"],
                                  cwd=Path(__file__).resolve().parents[1], stderr=subprocess.DEVNULL,
                                  env={k: v for k, v in os.environ.items() if k != "NANOSEEK_API_KEY"})
        url, rss = f"http://127.0.0.1:{port}", lambda: proc_rss(server.pid)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
    try:
        report = fuzz(url, model, args.requests, args.seed, args.timeout, args.concurrency, rss=rss,
                      api_key=(args.api_key or os.environ.get("NANOSEEK_API_KEY")) if args.url else None)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    report["date"] = time.strftime("%Y-%m-%d")
    out = Path(args.out or Path(__file__).parent / "results" / f"server_fuzz-{report['date']}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("by_family", "problems")}, indent=1))
    for problem in report["problems"]:
        print("problem:", problem)
    print(f"{'PASS' if report['ok'] else 'FAIL'}; report in {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
