"""`nanoseek train` through the parallel call sites: 2 processes with expert parallelism train like one
process (same command, same losses), write a sharded checkpoint and an HF export, and resume in another
layout (pp 2, 1F1B)."""

import json

import pytest

from nanoseek.parallel.launch import spawn

ARGS = ["train", "--preset", "debug", "--data.n_docs", "300", "--data.val_docs", "20", "--data.vocab_size", "300",
        "--data.seq_len", "32", "--train.batch_size", "4", "--train.max_steps", "2", "--train.eval_every", "0",
        "--train.samples", "0", "--train.eval_problems", "0", "--train.tensorboard", "false",
        "--train.log_every", "1", "--train.eval_batches", "2", "--train.warmup_steps", "2"]


def losses(out_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_train_command_at_two_processes_matches_one_and_resumes_in_another_layout(tmp_path):
    from nanoseek.cli import main

    plain, par = tmp_path / "plain", tmp_path / "par"
    assert main([*ARGS, "--train.out_dir", str(plain), "--train.device", "cpu"]) == 0
    spawn("nanoseek.cli:main", 2, ([*ARGS, "--train.out_dir", str(par), "--parallel.ep", "2"],), timeout_s=240)
    want, got = losses(plain), losses(par)
    assert set(got) == {1, 2}
    for step in (1, 2):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"
    assert (par / "hf" / "config.json").is_file() and (par / "checkpoints" / "step-000002" / "dcp").is_dir()
    spawn("nanoseek.cli:main", 2, ([*ARGS, "--train.out_dir", str(par), "--resume", "--train.max_steps", "3",
                                    "--parallel.pp", "2", "--parallel.schedule", "1f1b"],), timeout_s=240)
    assert 3 in losses(par) and json.loads((par / "summary.json").read_text())["step"] == 3
