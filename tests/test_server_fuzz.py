"""The fuzz harness (bench/server_fuzz.py) at CI size: a few hundred hostile requests against a tiny
model served on 127.0.0.1 with the default limits. The full size is
`python bench/server_fuzz.py --requests 1000` (a served subprocess, its RSS measured alone)."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch
from server_fixtures import running
from test_infer_fixtures import single_thread, write_tiny_ckpt

import nanoseek
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.infer import Engine
from nanoseek.infer.server import create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.server_fuzz import cases, fuzz, proc_rss  # noqa: E402

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)
REQUESTS = int(os.environ.get("NANOSEEK_FUZZ_REQUESTS", "1000"))


def test_fuzzed_requests_get_no_5xx_no_hangs_and_leave_the_server_as_it_was(tmp_path):
    ckpt = write_tiny_ckpt(tmp_path)
    engine = Engine(nanoseek.load_pretrained(ckpt), load_tokenizer(ckpt), max_batch_size=8, max_len=256)
    with running(create_app(engine, "tiny")) as url:
        report = fuzz(url, "tiny", REQUESTS, seed=0, timeout=60, concurrency=8,
                      rss=lambda: (gc.collect(), proc_rss(os.getpid()))[1])
    assert report["server_errors"] == 0 and report["hangs"] == 0, report["problems"]
    assert report["n_problems"] == 0, report["problems"]
    assert report["identical_before_after"]
    assert report["rss_within_20pct"], (report["rss_start_mib"], report["rss_end_mib"])
    families = {k.split()[0] for k in report["by_family"]}
    assert families == {"malformed_json", "wrong_type", "extreme_number", "invalid_unicode", "invalid_utf8",
                        "deep_nesting", "huge", "wrong_role", "protocol", "valid"}
    assert any(k.startswith("valid 200") for k in report["by_family"])  # not everything is refused


def test_the_cases_are_seeded():
    import random

    a = [next(cases(random.Random(3), "m", 100)) for _ in range(1)]
    gen_a, gen_b = cases(random.Random(3), "m", 100), cases(random.Random(3), "m", 100)
    assert [next(gen_a) for _ in range(50)] == [next(gen_b) for _ in range(50)] and a


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fuzz_on_a_gpu_with_cuda_graphs(tmp_path):
    """The same on CUDA with graphs (extreme settings must not reach the device as asserts); no RSS check
    (the CUDA context and caching allocator own host memory)."""
    ckpt = write_tiny_ckpt(tmp_path)
    engine = Engine(nanoseek.load_pretrained(ckpt, device="cuda"), load_tokenizer(ckpt), max_batch_size=8,
                    max_len=256, cuda_graph=True)
    with running(create_app(engine, "tiny")) as url:
        report = fuzz(url, "tiny", REQUESTS, seed=1, timeout=120, concurrency=8)
    assert report["server_errors"] == 0 and report["hangs"] == 0 and report["n_problems"] == 0, report["problems"]
    assert report["identical_before_after"]
