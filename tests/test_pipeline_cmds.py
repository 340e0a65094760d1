"""`nanoseek eval` and `nanoseek sample`: the pass@k estimator by hand, local vs server evaluation of a tiny
checkpoint, the readability filters on hand-made strings, and rejection sampling into a file that the SFT
reader loads and renders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.data.corpus import synthetic_corpus
from nanoseek.data.tasks import R1_SYSTEM
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.hf import copy_tokenizer_files
from nanoseek.model.transformer import Transformer
from nanoseek.pipeline import eval_cmd, sample_cmd
from nanoseek.pipeline.backend import EngineBackend, HTTPBackend, ckpt_step, cut_at_stop
from nanoseek.pipeline.eval_cmd import evaluate, load_problems, pass_at_k
from nanoseek.pipeline.readable import foreign_share, readability, repeated_line, to_r1_format
from nanoseek.pipeline.sample_cmd import balance, rejection_sample
from nanoseek.rl.rewards import UserProblem
from nanoseek.sft.data import read_examples, render

GOOD = "<think> 2 plus 3 is 5 </think> <answer> 5 </answer>"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random debug model with wide logit margins (greedy argmax is stable across batch shapes) and a small
    BPE tokenizer with the R1 chat template, saved as an HF checkpoint."""
    root = tmp_path_factory.mktemp("pipeline")
    tok = train_tokenizer(synthetic_corpus(100, 0, (1, 3)), 300, root / "tok")
    cfg = preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id,
                 pad_token_id=tok.pad_id, max_position_embeddings=512)
    model = Transformer.from_config(cfg, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
        for moe in model.moe_layers:
            moe.gate.weight.mul_(10)
    nanoseek.save_pretrained(model, root / "ckpt")
    copy_tokenizer_files(root / "tok", root / "ckpt")
    return root / "ckpt"


MEMO = " <think> 2 plus 3 </think> <answer> 5 </answer>"


@pytest.fixture(scope="module")
def taught(ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint fitted (200 Adam steps, ~7 s) to answer "What is 2 + 3?" with MEMO, so that
    sampling and evaluation see real correct, well-formed completions."""
    from nanoseek.rl.rewards import prompt_text

    tok = load_tokenizer(ckpt)
    model = nanoseek.load_pretrained(ckpt).train()
    prompt = tok.encode_prompt(prompt_text("What is 2 + 3?", "r1"))
    ids = torch.tensor([prompt + tok.encode(MEMO)])  # (1, T); no EOS: only the stop string ends it
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(200):
        logits = model(ids[:, :-1]).logits  # (1, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits[0, len(prompt) - 1:], ids[0, len(prompt):])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    out = tmp_path_factory.mktemp("taught") / "run" / "checkpoints" / "step-000200"
    nanoseek.save_pretrained(model.eval(), out)
    copy_tokenizer_files(ckpt, out)
    return out


# ---------------------------------------------------------------------------- pass@k
def test_pass_at_k_matches_hand_computation():
    # n=5 samples, c=2 correct, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # k=1: the share correct
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0  # n = k: any correct
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - (7 * 6 * 5 * 4) / (10 * 9 * 8 * 7))
    # against the product form 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    for n, c, k in ((20, 5, 3), (16, 1, 8), (9, 4, 5)):
        prod = math.prod(1 - k / i for i in range(n - c + 1, n + 1))
        assert pass_at_k(n, c, k) == pytest.approx(1 - prod)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 8)


class Scripted:
    """A backend that answers from a script: prompt index -> list of texts (cycled for n choices)."""

    name = "scripted"

    def __init__(self, script):
        self.script, self.calls = script, []

    def complete(self, prompts, n, *, temperature, top_p, max_tokens, seed):
        self.calls.append((len(prompts), n, temperature))
        return [[self.script(p, temperature)[j % len(self.script(p, temperature))] for j in range(n)]
                for p in prompts]


def test_eval_report_counts_by_kind_and_difficulty():
    problems = [UserProblem("What is 2 + 3?", "5", "add", 1), UserProblem("What is 4 + 4?", "8", "add", 2),
                UserProblem("What is 9 - 1?", "8", "sub", 1)]

    def script(prompt, temperature):
        if "2 + 3" in prompt:  # greedy right; samples: 1 of 4 right
            return [GOOD] if temperature == 0 else [GOOD, "<answer> 6 </answer>", "x", "y"]
        if "4 + 4" in prompt:  # greedy wrong (no format, a reflection marker); samples all wrong
            return ["wait, Answer: 7"]
        return ["<think>\n9 - 1 = 8, check\n9 - 1 = 8, check\n</think> <answer> 8 </answer>"]  # right, loops

    result = evaluate(Scripted(script), problems, k=2, samples=4, max_new_tokens=8)
    assert result["pass@1"] == pytest.approx(2 / 3)
    assert result["format_rate"] == pytest.approx(2 / 3)
    assert result["readable_rate"] == pytest.approx(1 / 3)  # the third has the format but repeats a line
    assert result["by_kind"]["sub"]["readable"] == 0.0 and result["by_kind"]["sub"]["format"] == 1.0
    assert result["reflection_rate"] == pytest.approx(2 / 3)  # "wait", and "check"
    assert result["pass@2"] == pytest.approx(((1 - 3 / 6) + 0 + 1) / 3)  # C(3,2)/C(4,2) = 3/6
    assert result["sampled_acc"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert result["by_kind"]["add"]["pass@1"] == pytest.approx(0.5) and result["by_kind"]["sub"]["n"] == 1
    assert result["by_difficulty"]["add/2"]["pass@2"] == 0.0
    assert "add/1" in eval_cmd.table(result)


def test_eval_errors_name_the_problem():
    with pytest.raises(SystemExit, match="--difficulty"):
        eval_cmd.parse_range("3-1")
    with pytest.raises(SystemExit, match="unknown"):
        load_problems("add,nope", "1-2", 5, None, 0)
    with pytest.raises(SystemExit, match="--samples"):
        evaluate(Scripted(lambda p, t: [GOOD]), [UserProblem("q", "5")], k=4, samples=2)
    with pytest.raises(SystemExit, match="--ckpt DIR"):
        eval_cmd.main(["--n", "2"])
    with pytest.raises(SystemExit, match="--model"):
        HTTPBackend("http://127.0.0.1:1/v1", "")


def test_cut_at_stop_keeps_the_closing_tag():
    assert cut_at_stop("<answer> 5 </answer> trailing") == "<answer> 5 </answer>"
    assert cut_at_stop("no tag") == "no tag"


def test_ckpt_step_from_manifest_or_name(tmp_path):
    (tmp_path / "step-000120").mkdir()
    assert ckpt_step(tmp_path / "step-000120") == 120
    (tmp_path / "step-000120" / "manifest.json").write_text('{"step": 121}')
    assert ckpt_step(tmp_path / "step-000120") == 121
    assert ckpt_step(tmp_path) is None


# ---------------------------------------------------------------------------- local vs server
def test_local_and_server_eval_agree(taught, tmp_path):
    """The same problems evaluated on the engine and through the project's server (in-process, over HTTP):
    identical greedy texts, so identical pass@1, format rate and lengths; seeded samples agree too."""
    from server_fixtures import running

    from nanoseek.infer.engine import Engine
    from nanoseek.infer.server import create_app

    problems = [*load_problems("add,sub", "1-2", 3, None, 0), UserProblem("What is 2 + 3?", "5", "add", 1)]
    local = EngineBackend(taught, "cpu", max_batch_size=8)
    opts = dict(k=2, max_new_tokens=20, seed=3, tokenizer=local.tokenizer)
    here = evaluate(local, problems, **opts)
    engine = Engine(nanoseek.load_pretrained(taught), load_tokenizer(taught), max_batch_size=4, max_len=512)
    prompts = [p.prompt for p in problems[:2]]
    sampled = dict(temperature=3.0, top_p=1.0, max_tokens=6, seed=11)  # hot: the taught model is peaked
    with running(create_app(engine, "tiny")) as url:
        remote = evaluate(HTTPBackend(url + "/v1", "tiny"), problems, **opts)
        remote_samples = HTTPBackend(url + "/v1", "tiny").complete(prompts, 3, **sampled)
    local_samples = local.complete(prompts, 3, **sampled)
    assert local_samples == remote_samples and len(set(local_samples[0])) > 1  # seeded, and really sampled
    assert [e["completion"] for e in here["examples"]] == [e["completion"] for e in remote["examples"]]
    assert here["examples"][0]["completion"]  # something was generated
    assert here["pass@1"] == 0.25 and here["by_difficulty"]["add/1"]["pass@1"] > 0  # the taught problem
    for key in ("pass@1", "format_rate", "readable_rate", "reflection_rate", "mean_length_chars",
                "mean_length_tokens", "pass@2", "by_difficulty", "per_problem"):
        assert here[key] == remote[key], key
    assert [r["uid"] for r in here["per_problem"]] == [p.uid for p in problems]
    assert sum(r["pass@1"] for r in here["per_problem"]) / len(problems) == here["pass@1"]


def test_eval_cli_writes_json_and_table(ckpt, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert eval_cmd.main(["--ckpt", str(ckpt), "--tasks", "add", "--difficulty", "1-2", "--n", "3", "--k", "2",
                          "--max-new-tokens", "4", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and "pass@2" in result and set(result["by_kind"]) == {"add"}
    printed = capsys.readouterr().out
    assert "pass@1" in printed and ("add/1" in printed or "add/2" in printed)


# ---------------------------------------------------------------------------- readability filters
def test_readability_filters_on_hand_made_strings():
    assert readability(GOOD) is None
    assert readability("<answer> 5 </answer>") == "format"  # no think block
    assert readability("<think> a </think> <answer> 5 </answer> <answer> 6 </answer>") == "format"
    assert readability("<think> " + "1 + 1 = 2; " * 50 + "</think> <answer> 2 </answer>", max_chars=100) == "length"
    garbled = "<think> 2 plus 3 \x00\x07 es cinco 五 </think> <answer> 5 </answer>"
    assert foreign_share(garbled) == pytest.approx(3 / len(garbled))
    assert readability(garbled) == "garbled"
    assert readability(garbled, max_foreign=0.1) is None  # a tolerance lets a few through
    loop = "<think>\n2 plus 3 makes 5\n2 plus 3 makes 5\n</think> <answer> 5 </answer>"
    assert repeated_line(loop) == "2 plus 3 makes 5" and readability(loop) == "repeated"
    assert repeated_line("<think>\nok\nok\n</think>") is None  # short lines ("ok") may repeat


def test_plain_reasoning_is_rewritten_into_the_r1_template():
    plain = " 2 + 3 = 5, reached the target\nCheck: 2 + 3 = 5. Correct.\nAnswer: 2 + 3\n"
    assert to_r1_format(plain) == ("<think>\n2 + 3 = 5, reached the target\nCheck: 2 + 3 = 5. Correct.\n</think> "
                                   "<answer> 2 + 3 </answer>")
    assert readability(to_r1_format(plain)) is None
    assert to_r1_format(GOOD) == GOOD  # already in the template
    for text in ("Answer: 5", "2 + 3 = 5", "2 + 3 = 5\nAnswer: 5\nmore text", "<think> a\nAnswer: 5",
                 "a\nAnswer:   "):
        assert to_r1_format(text) is None, text  # no reasoning, no final answer line, stray tags, empty answer


def test_rejection_sampling_reformats_only_when_asked():
    problems = [UserProblem("What is 2 + 3?", "5", "add", 1)]
    plain = "2 plus 3 is 5\nAnswer: 5"

    def script(prompt, temperature):
        return [plain, "2 plus 3 is 6\nAnswer: 6"]

    kept, stats = rejection_sample(Scripted(script), problems, 2, temperature=1.0, top_p=1.0, max_new_tokens=8,
                                   seed=0, max_chars=4000, max_foreign=0.0, progress=False)
    assert kept == [] and stats["rejected"]["format"] == 1 and stats["rejected"]["wrong"] == 1
    kept, stats = rejection_sample(Scripted(script), problems, 2, temperature=1.0, top_p=1.0, max_new_tokens=8,
                                   seed=0, max_chars=4000, max_foreign=0.0, progress=False, reformat=True)
    assert [s["completion"] for s in kept] == ["<think>\n2 plus 3 is 5\n</think> <answer> 5 </answer>"]
    assert kept[0]["format"] == 0.0 and sum(stats["reformatted"].values()) == 1  # the record keeps the original's
    assert "1 correct completions rewritten" in sample_cmd.report(stats, 1)


def test_balance_caps_prompts_and_buckets():
    kept = [{"prompt": f"p{i % 3}", "kind": "add", "difficulty": 1, "completion": str(i)} for i in range(9)]
    kept += [{"prompt": "q", "kind": "sub", "difficulty": 2, "completion": "x"}]
    out = balance(kept, per_prompt=2, per_bucket=4, seed=0)
    add = [s for s in out if s["kind"] == "add"]
    assert len(add) == 4 and len({s["prompt"] for s in add}) == 3  # round-robin: every prompt before a second
    assert len([s for s in out if s["kind"] == "sub"]) == 1
    assert len(balance(kept, 0, 0, 0)) == len(kept)


# ---------------------------------------------------------------------------- rejection sampling
def test_rejection_sampling_output_loads_in_the_sft_reader(ckpt, tmp_path):
    """Scripted completions through verification, filters and dedup; the written file reads and renders
    with the SFT data reader, the assistant mask covering exactly the kept completion."""
    problems = [UserProblem("What is 2 + 3?", "5", "add", 1), UserProblem("What is 7 - 2?", "5", "sub", 1)]
    script = [GOOD, " " + GOOD + " ", "<think> guess </think> <answer> 6 </answer>", "Answer: 5",
              "<think> 5 \x00\x00 </think> <answer> 5 </answer>", "<think> five </think> <answer> 5 </answer>"]
    kept, stats = rejection_sample(Scripted(lambda p, t: script), problems, 6, temperature=1.0, top_p=1.0,
                                   max_new_tokens=16, seed=0, max_chars=400, max_foreign=0.0, progress=False)
    assert stats["rejected"] == {"wrong": 2, "duplicate": 2, "format": 2, "garbled": 2}
    assert len(kept) == 4 and sum(stats["drawn"].values()) == 12
    path = tmp_path / "sft.jsonl"
    prov = {"model": "scripted", "step": 7, "settings": {"n": 6}}
    path.write_text("".join(json.dumps(sample_cmd.to_record(s, prov)) + "\n" for s in kept))
    examples = read_examples(path)
    assert len(examples) == 4 and examples[0][1][0] == {"role": "system", "content": R1_SYSTEM}
    line = json.loads(path.read_text().splitlines()[0])
    assert line["provenance"]["step"] == 7 and line["reward"]["accuracy"] == 1.0
    tok = load_tokenizer(ckpt)
    ids, mask = render(tok, examples[0][1])
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert GOOD in trained and "User:" not in trained
    assert tok.decode(ids).startswith(R1_SYSTEM + "\nUser: What is 2 + 3?\nAssistant:")


def test_sample_cli_end_to_end_on_the_engine(taught, tmp_path, capsys):
    """K samples per prompt on the engine: correct ones kept, wrong ones (the same completion against a
    different expected answer) rejected, duplicates dropped; the file reads in the SFT reader with provenance."""
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": "What is 2 + 3?", "answer": "5", "kind": "add", "difficulty": 1},
             {"prompt": "What is 2 + 3?", "answer": "6", "kind": "trap", "difficulty": 1}]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "s.jsonl"
    run_dir = taught.parent.parent  # a run directory: its latest checkpoint is used
    assert sample_cmd.main(["--ckpt", str(run_dir), "--prompts", str(prompts), "--n", "4", "--top-p", "0.9",
                            "--max-new-tokens", "24", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "add/1" in printed and "trap/1" in printed and "wrong 4" in printed and "duplicate 3" in printed
    examples = read_examples(out)
    assert len(examples) == 1 and examples[0][1][2] == {"role": "assistant", "content": MEMO.strip()}
    line = json.loads(out.read_text())
    assert line["provenance"]["step"] == 200 and line["provenance"]["settings"]["n"] == 4
    assert line["reward"] == {"accuracy": 1.0, "format": 1.0} and line["kind"] == "add"


def test_eval_of_a_taught_checkpoint(taught, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n"
                       + json.dumps({"prompt": "What is 2 + 3?", "answer": "6", "kind": "trap"}) + "\n")
    out = tmp_path / "e.json"
    assert eval_cmd.main(["--ckpt", str(taught), "--prompts", str(prompts), "--k", "2", "--samples", "3",
                          "--top-p", "0.9", "--max-new-tokens", "24", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["pass@1"] == 0.5 and result["format_rate"] == 1.0
    assert result["by_kind"]["jsonl"]["pass@1"] == 1.0 and result["by_kind"]["trap"]["pass@2"] == 0.0
    assert result["examples"][0]["completion"] == MEMO


def test_sample_bad_input_names_the_problem(ckpt, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    base = ["--ckpt", str(ckpt), "--out", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit, match="is empty"):
        sample_cmd.main([*base, "--prompts", str(empty)])
    with pytest.raises(SystemExit, match="K must be at least 1"):
        sample_cmd.main([*base, "--prompts", "synthetic", "--n", "0"])
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "What is 1 + 1?"}\n')
    with pytest.raises(SystemExit, match="line 1 has no 'answer'"):
        sample_cmd.main([*base, "--prompts", str(missing)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,cuda_graph", [("float32", False), ("bfloat16", True)])
def test_eval_on_the_gpu_matches_the_cpu(taught, dtype, cuda_graph):
    """The taught problem on CUDA (fp32 eager; bf16 with CUDA graphs): the same greedy completion as on the CPU."""
    problems = [UserProblem("What is 2 + 3?", "5", "add", 1)]
    cpu = evaluate(EngineBackend(taught, "cpu"), problems, k=0, max_new_tokens=24)
    gpu = evaluate(EngineBackend(taught, "cuda", dtype=dtype, cuda_graph=cuda_graph), problems, k=0,
                   max_new_tokens=24)
    assert gpu["examples"][0]["completion"] == cpu["examples"][0]["completion"] == MEMO
    assert gpu["pass@1"] == 1.0 and gpu["format_rate"] == 1.0
