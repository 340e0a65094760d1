"""Training-run reliability (issue 20): NaN/Inf guards, checksummed checkpoints and the fallback of
--resume, disk-full messages, guarded run directories, resume with the saved configuration, a continuous
schedule, and the top-level CLI. Tiny: the debug preset, a few steps, most checks without training."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from nanoseek import Transformer, load_pretrained, preset
from nanoseek.hf import CheckpointError
from nanoseek.train.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from nanoseek.train.config import parse_args
from nanoseek.train.optim import build_optimizer, continued_multiplier, lr_multiplier, schedule_anchor
from nanoseek.train.resume import find_checkpoint, resumed_run
from nanoseek.train.step import accumulate_gradients, optimizer_step, pretraining_loss
from nanoseek.train.trainer import train

TINY = ["--preset", "debug", "--data.n_docs", "300", "--data.val_docs", "40", "--data.vocab_size", "300",
        "--data.seq_len", "32", "--train.batch_size", "4", "--train.log_every", "1", "--train.eval_every", "0",
        "--train.samples", "0", "--train.eval_problems", "0", "--train.tensorboard", "false",
        "--train.warmup_steps", "2"]


def run(out: Path, *extra: str) -> dict:
    return train(parse_args([*TINY, "--train.out_dir", str(out), *extra]))


# ---------------------------------------------------------------------------- NaN / Inf steps
def debug_step(optimizer_factory, poison: bool):
    """A debug model, one step whose gradients are NaN when `poison`; returns (before, after, out, opt)."""
    model = Transformer.from_config(preset("debug"), seed=0).train()
    opt = optimizer_factory(model)
    x = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    batches = [(x[:, :-1], x[:, 1:])]

    def step():
        out = accumulate_gradients(model, batches, pretraining_loss(0.3, 1e-2), contextlib.nullcontext())
        if poison:
            next(model.parameters()).grad[0, 0] = float("nan")
        return out | optimizer_step(model, opt, lr=1e-3, grad_clip=1.0, bias_gamma=1e-2, skip_nonfinite=True,
                                    also_finite=list(out.values()))

    poison_later, poison = poison, False
    step()  # one good step first, so the optimizer has moments and a step count to protect
    poison = poison_later
    before = ({k: v.clone() for k, v in model.state_dict().items()},
              {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()})
    out = step()
    after = (model.state_dict(), opt.state_dict()["state"])
    return before, after, out


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "found_inf-on-device"])
def test_nonfinite_step_changes_nothing(fused):
    factory = (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)) if fused else \
        (lambda m: build_optimizer(m, 1e-3, (0.9, 0.95), 1e-8, 0.1))
    (w0, s0), (w1, s1), out = debug_step(factory, poison=True)
    assert not bool(out["finite"]) and not torch.isfinite(out["grad_norm"])
    for name in w0:  # weights and router biases (buffers) untouched
        assert torch.equal(w0[name], w1[name]), name
    for key in s0:  # moments and step counts untouched
        for n in s0[key]:
            assert torch.equal(s0[key][n], s1[key][n]), (key, n)
    assert not out["loads"].any()  # the step's expert counts were dropped
    (w0, _), (w1, _), out = debug_step(factory, poison=False)  # the control: a finite step moves the weights
    assert bool(out["finite"]) and any(not torch.equal(w0[n], w1[n]) for n in w0)


def test_diverging_run_stops_and_never_writes_a_nan_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit, match="3 steps in a row had a NaN/Inf loss or gradient norm.*lower --train.lr"):
        run(tmp_path, "--train.lr", "1e6", "--train.ckpt_every", "2", "--train.keep_last", "2",
            "--train.max_nonfinite", "3", "--train.max_steps", "40", "--train.warmup_steps", "1")
    assert "warning: skipped" in capsys.readouterr().out
    kept = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert kept  # the checkpoints written before the divergence stay
    for ckpt in kept:
        verify_checkpoint(ckpt)
        model = load_pretrained(ckpt)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kill_9_mid_run_then_resume_is_exact(tmp_path):
    """SIGKILL a real training process that checkpoints every step (the kill lands in a step or inside a
    checkpoint write); --resume alone then ends with the losses and weights of a run never killed."""
    import os
    import signal
    import subprocess
    import sys

    flags = ["--train.max_steps", "5", "--train.ckpt_every", "1", "--train.keep_last", "2", "--train.eval_batches", "1"]
    run(tmp_path / "straight", *flags)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "straight" / "data", killed / "data")  # the prepared shards (cached by config)
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "train", *TINY, "--train.out_dir", str(killed),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "step      2/" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    train(parse_args(["--train.out_dir", str(killed), "--resume"]))

    def losses(out: Path) -> dict:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len([r for r in rows if r["kind"] == "train"]) == 5  # each step logged once
        return {r["step"]: (r["loss"], r["mtp_loss"], r["grad_norm"]) for r in rows if r["kind"] == "train"}

    assert losses(killed) == losses(tmp_path / "straight")
    a = load_pretrained(tmp_path / "straight" / "checkpoints" / "step-000005")
    b = load_pretrained(killed / "checkpoints" / "step-000005")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory):
    """Three checkpoints of a tiny model (written directly: no training needed to test the files)."""
    out = tmp_path_factory.mktemp("ckpts")
    model = Transformer.from_config(preset("debug"), seed=0)
    for step in (1, 2, 3):
        save_checkpoint(out, step, model, {"step": step}, None, {"config": None}, keep_last=5)
    return out


def damage(path: Path, how: str) -> Path:
    """Copy a checkpoint and damage the copy; return the file that must be named."""
    if how == "truncated weights":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif how == "empty weights":
        f = path / "model.safetensors"
        f.write_bytes(b"")
    elif how == "truncated state":
        f = path / "trainer_state.pt"
        f.write_bytes(f.read_bytes()[:-10])
    elif how == "bad json":
        f = path / "config.json"
        f.write_text("{not json")
    elif how == "wrong shape":
        f = path / "config.json"
        f.write_text(f.read_text().replace('"hidden_size": 64', '"hidden_size": 96'))
    elif how == "deleted state":
        f = path / "trainer_state.pt"
        f.unlink()
    elif how == "bad manifest":
        f = path / "manifest.json"
        f.write_text("[")
    return f


@pytest.mark.parametrize("how", ["truncated weights", "empty weights", "truncated state", "bad json", "wrong shape",
                                 "deleted state", "bad manifest"])
def test_damaged_checkpoint_is_named_and_skipped(ckpt_run, tmp_path, how):
    run_dir = tmp_path / "run"
    shutil.copytree(ckpt_run, run_dir)
    newest = run_dir / "checkpoints" / "step-000003"
    bad_file = damage(newest, how)
    with pytest.raises(CheckpointError, match=str(bad_file.name)):
        verify_checkpoint(newest)
    with pytest.raises(SystemExit, match=f"--resume {newest}: .*{bad_file.name}") as e:  # named: no fallback
        find_checkpoint(str(newest), run_dir)
    assert "\n" not in str(e.value)  # one line
    said = []
    assert find_checkpoint("auto", run_dir, log=said.append).name == "step-000002"  # the newest intact one
    assert len(said) == 1 and "skipping step-000003" in said[0] and bad_file.name in said[0]


def test_resume_errors_name_the_problem(ckpt_run, tmp_path):
    with pytest.raises(SystemExit, match="no-such-dir: no such directory"):
        find_checkpoint(str(tmp_path / "no-such-dir"), tmp_path)
    assert find_checkpoint(str(ckpt_run), tmp_path).name == "step-000003"  # a run directory: its newest
    with pytest.raises(SystemExit, match="no intact checkpoint.*step-000001.*step-000001"):
        broken = tmp_path / "broken"
        shutil.copytree(ckpt_run / "checkpoints" / "step-000001", broken / "checkpoints" / "step-000001")
        damage(broken / "checkpoints" / "step-000001", "truncated weights")
        find_checkpoint("auto", broken)


def test_resume_keeps_one_line_of_checkpoints(ckpt_run, tmp_path):
    from nanoseek.train.resume import check_resume_target

    ckpts = ckpt_run / "checkpoints"
    with pytest.raises(SystemExit, match="went on past it .step-000003.*--train.out_dir NEW"):
        check_resume_target(ckpts / "step-000002", ckpt_run, chosen=True)  # an older one, chosen explicitly
    check_resume_target(ckpts / "step-000003", ckpt_run, chosen=True)  # the newest: fine
    check_resume_target(ckpts / "step-000002", ckpt_run, chosen=False)  # --resume fell back past a damaged one
    check_resume_target(ckpts / "step-000002", tmp_path / "branch", chosen=True)  # into a fresh directory
    with pytest.raises(SystemExit, match="already holds a run"):  # another run's checkpoint into a used directory
        check_resume_target(tmp_path / "other" / "checkpoints" / "step-000001", ckpt_run, chosen=True)


def test_legacy_checkpoint_with_nan_weights_says_so(tmp_path):
    model = Transformer.from_config(preset("debug"), seed=0)
    with torch.no_grad():  # as a diverged run left it (the embedding too: once "Unexpected key(s) mtp.0...")
        for p in model.parameters():
            p.fill_(float("nan"))
    path = save_checkpoint(tmp_path, 1, model, {"step": 1}, None, {}, keep_last=1)
    (path / "manifest.json").unlink()  # as written before manifests existed
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_checkpoint(path, Transformer.from_config(preset("debug"), seed=0))


# ---------------------------------------------------------------------------- disk full, used out_dir
@pytest.mark.parametrize("error", ["RuntimeError", "SafetensorError"])
def test_disk_full_of_any_kind_gets_the_message(tmp_path, monkeypatch, error):
    from safetensors import SafetensorError

    import nanoseek.hf

    def disk_full(*a, **k):
        kind = RuntimeError if error == "RuntimeError" else SafetensorError
        raise kind("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(nanoseek.hf, "save_file", disk_full)
    with pytest.raises(SystemExit, match=f"the disk is full: {error}.*no earlier checkpoint"):
        run(tmp_path, "--train.max_steps", "1")
    assert not list((tmp_path / "checkpoints").iterdir())  # no partial directory left


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(out, "--train.max_steps", "4", "--train.ckpt_every", "2", "--train.lr", "3e-3")
    return out


def test_fresh_run_refuses_a_used_out_dir(finished_run, tmp_path):
    with pytest.raises(SystemExit, match="already holds a run .checkpoints step-000002..step-000004.; continue it "
                                         "with --resume, or .* fresh directory with --train.out_dir"):
        run(finished_run, "--train.max_steps", "4")
    (tmp_path / "metrics.jsonl").write_text("")  # a run that died before its first checkpoint
    with pytest.raises(SystemExit, match="wrote no checkpoint; .*--train.out_dir DIR, or delete .*metrics.jsonl"):
        run(tmp_path, "--train.max_steps", "4")


def test_resume_uses_the_saved_configuration(finished_run):
    ckpt = finished_run / "checkpoints" / "step-000004"
    said = []
    got = resumed_run(parse_args(["--resume", "--train.max_steps", "9", "--train.lr", "1e-3"]), ckpt, said.append)
    assert got.preset == "debug" and got.data.n_docs == 300 and got.model.vocab_size == 300  # saved, not defaults
    assert got.train.max_steps == 9 and got.train.lr == 1e-3 and got.train.batch_size == 4
    assert said == ["resume: --train.max_steps 4 -> 9", "resume: --train.lr 0.003 -> 0.001"]
    for flags, named in [(["--data.source", "corpus.jsonl"], "--data.source 'corpus.jsonl'"),
                         (["--data.tokenizer", "tok"], "--data.tokenizer 'tok'"),
                         (["--model.num_hidden_layers", "2"], "--model.num_hidden_layers 2"),
                         (["--preset", "demo"], "--preset demo"),
                         (["--train.batch_size", "8"], "--train.batch_size 8 .the run has 4; the loader")]:
        with pytest.raises(SystemExit, match=f"would change it: {named}"):
            resumed_run(parse_args(["--resume", *flags]), ckpt)
    same = resumed_run(parse_args([*TINY, "--resume"]), ckpt, said.append)  # retyping the same flags is fine
    assert same.train.max_steps == 4 and len(said) == 2


def test_extending_max_steps_keeps_the_schedule_continuous(finished_run):
    # the 4-step run ended its decay; extended to 8, the lr goes on from where it was (no jump to the peak)
    out = train(parse_args(["--train.out_dir", str(finished_run), "--resume", "--train.max_steps", "8"]))
    assert out["step"] == 8
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if r["kind"] == "train"}
    assert sorted(lrs) == list(range(1, 9))
    assert lrs[5] <= lrs[4] * 1.0001  # the old schedule restarted: lr(step 5 of 8) = 3e-3 > lr(4) = 1.65e-3


def test_continued_schedule_has_no_jumps():
    kw = dict(warmup=10, schedule="v3", decay_frac=0.4, min_ratio=0.1)
    for schedule in ("v3", "wsd", "cosine"):
        kw["schedule"] = schedule
        for stop, new_total in [(80, 200), (50, 200), (80, 90), (100, 300), (30, 60)]:
            anchor = schedule_anchor(stop, dict(total=100, **kw), dict(total=new_total, **kw), None)
            old = [lr_multiplier(s, 100, **kw) for s in range(stop)]
            new = [continued_multiplier(s, new_total, anchor=anchor, **kw) for s in range(stop, new_total + 1)]
            steps = [b - a for a, b in zip(old + new, (old + new)[1:])]
            assert max(abs(d) for d in steps[10:]) < 0.15, (schedule, stop, new_total)  # no jump anywhere
            assert new[-1] == pytest.approx(0.1)  # ends at min_lr_ratio at the new total
    # a longer run resumed in the constant phase simply keeps the v3 shape of the new total
    assert schedule_anchor(50, dict(total=100, **{**kw, "schedule": "v3"}),
                           dict(total=200, **{**kw, "schedule": "v3"}), None) is None


# ---------------------------------------------------------------------------- settings and the CLI
def test_bad_settings_are_named():
    for flags, message in [(["--model.hidden_size", "-5"], "--model.hidden_size -5: must be a positive integer"),
                           (["--model.num_hidden_layers", "0"], "--model.num_hidden_layers 0"),
                           (["--train.batch_size", "0"], "--train.batch_size 0: must be at least 1"),
                           (["--train.lr", "nan"], "--train.lr nan: must be a positive finite number"),
                           (["--train.max_steps", "-1"], "--train.max_steps -1"),
                           (["--data.seq_len", "1"], "--data.seq_len 1"),
                           (["--data.vocab_size", "100"], "--data.vocab_size 100: must be at least 262"),
                           (["--data.kinds", "countdown,div"], "--data.kinds 'countdown,div': must be a comma")]:
        with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
            parse_args(flags)


def test_bare_nanoseek_prints_usage_and_version(capsys):
    from nanoseek.cli import main

    assert main([]) == 0
    assert "usage: nanoseek <command>" in capsys.readouterr().out  # and no training started
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nanoseek {__import__('nanoseek').__version__}"
    assert main(["--train.lr", "1"]) == 2
    assert "needs a command before it, e.g. `nanoseek train --train.lr 1`" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_guard_skips_on_the_device_without_a_sync():
    """The trainer's CUDA path (fused AdamW, found_inf): a NaN step changes nothing, and neither the
    step nor the guard's counters read anything on the host (CUDA sync debug mode raises on a sync)."""
    from nanoseek.train.guard import NonFiniteGuard

    model = Transformer.from_config(preset("debug"), device="cuda", seed=0).train()
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    assert opt.defaults["fused"]
    x = torch.randint(0, 512, (2, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    guard = NonFiniteGuard(torch.device("cuda"), 0, limit=2)
    snapshots = []
    for poison in (False, True, True):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})  # before the step
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = accumulate_gradients(model, [(x[:, :-1], x[:, 1:])], pretraining_loss(0.3, 1e-2),
                                       contextlib.nullcontext())
        if poison:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out |= optimizer_step(model, opt, lr=1e-3, grad_clip=1.0, bias_gamma=1e-2, skip_nonfinite=True,
                                  also_finite=list(out.values()))
            guard.update(out["finite"])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    after = model.state_dict()
    assert all(torch.equal(snapshots[1][k], after[k]) for k in after)  # two skipped steps: nothing moved
    assert any(not torch.equal(snapshots[0][k], snapshots[1][k]) for k in after)  # the good step did
    note, stop = guard.check()
    assert stop and "skipped 2 step(s)" in note and guard.last_bad_step() == 3


def test_a_second_run_in_the_same_directory_is_refused(tmp_path):
    """Two runs in one out_dir would prune and overwrite each other's checkpoints: the second is refused,
    naming the holder; the holder itself may claim its directory again (a resume in the same session)."""
    import subprocess
    import sys

    from nanoseek.train.checkpoint import lock_run_dir

    lock_run_dir(tmp_path, "train")
    lock_run_dir(tmp_path, "train")  # the same process: allowed
    code = f"from nanoseek.train.checkpoint import lock_run_dir; lock_run_dir({str(tmp_path)!r}, 'rl')"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0
    assert "is in use by pid" in other.stderr and "--train.out_dir" in other.stderr
    free = tmp_path / "elsewhere"
    free.mkdir()
    code = f"from nanoseek.train.checkpoint import lock_run_dir; lock_run_dir({str(free)!r}, 'rl')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
