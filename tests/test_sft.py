"""`nanoseek sft`: the assistant mask token by token, packing == each document alone, exact resume, a fresh
distilled student, and clear errors for bad input. Tiny (debug preset, a 300-token BPE), CPU, fp32."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import load_pretrained, preset, save_pretrained
from nanoseek.data.tasks import R1_SYSTEM
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.hf import copy_tokenizer_files
from nanoseek.model.transformer import Transformer
from nanoseek.sft.config import parse_args
from nanoseek.sft.data import (
    IGNORE,
    Document,
    SFTDataError,
    collate,
    pack_rows,
    parse_example,
    read_examples,
    render,
    render_all,
)
from nanoseek.sft.loop import sft
from nanoseek.sft.loss import mtp_targets, token_losses
from nanoseek.sft.masking import install_document_masking
from nanoseek.train.metrics import read_metrics

QA = [("What is 2+3?", "<think>2 plus 3 is 5</think> <answer>5</answer>"),
      ("What is 7*6?", "<think>7 times 6 is 42</think> <answer>42</answer>"),
      ("Sort 3 1 2.", "<think>smallest first</think> <answer>1 2 3</answer>"),
      ("What is 10-4?", "<think>10 minus 4 is 6</think> <answer>6</answer>")]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny HF checkpoint (debug preset) with a BPE tokenizer that ships the R1 chat template."""
    root = tmp_path_factory.mktemp("sft")
    texts = [f"{R1_SYSTEM}\nUser: {q}\nAssistant: {a}" for q, a in QA] * 20
    tok = train_tokenizer(texts, 300, root / "tok")
    cfg = preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_pretrained(Transformer.from_config(cfg, seed=0), root / "teacher")
    copy_tokenizer_files(root / "tok", root / "teacher")
    data = root / "chats.jsonl"
    lines = [{"system": "Solve it.", "prompt": q, "completion": a} for q, a in QA]  # short rows, quick tests
    lines.append({"messages": [{"role": "system", "content": "Solve."}, {"role": "user", "content": QA[0][0]},
                               {"role": "assistant", "content": "5"},
                               {"role": "user", "content": QA[1][0]}, {"role": "assistant", "content": "42"}],
                  "source": "provenance is ignored"})
    data.write_text("".join(json.dumps(x) + "\n" for x in lines * 3))
    return root, tok


def run(*args: str):
    return sft(parse_args(["--train.device", "cpu", "--train.tensorboard", "false", "--train.batch_size", "2",
                           "--sft.seq_len", "128", *args]))


# ---------------------------------------------------------------------------- rendering and the mask
def test_assistant_mask_token_by_token(teacher):
    _, tok = teacher
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"},
                {"role": "user", "content": "a trailing question, no answer: no loss"}]
    ids, mask = render(tok, messages)
    eos = "<|end_of_text|>"
    assert len(ids) == len(mask)
    assert tok.decode(ids) == f"{R1_SYSTEM}\nUser: 2+2?\nAssistant: 4{eos}\nUser: 3+3?\nAssistant: 6{eos}"
    # every token, one at a time: the trained ones spell exactly the two answers with their end-of-turn
    trained = [tok.decode([i]) for i, m in zip(ids, mask) if m]
    assert "".join(trained) == f" 4{eos} 6{eos}"
    assert [tok.decode([i]) for i, m in zip(ids, mask) if m][-1] == eos and ids[-1] == tok.eos_id
    prompt_part = "".join(tok.decode([i]) for i, m in zip(ids, mask) if not m)
    assert prompt_part == f"{R1_SYSTEM}\nUser: 2+2?\nAssistant:\nUser: 3+3?\nAssistant:"
    # the first prompt is encoded exactly as a server encodes the rendered chat
    first = tok.encode(tok.apply_chat_template(messages[:1]))
    assert ids[:len(first)] == first and mask[:len(first)] == [0] * len(first) and mask[len(first)] == 1
    # prompt/completion is the one-turn conversation
    pc = parse_example(json.dumps({"prompt": "2+2?", "completion": "4"}))
    assert render(tok, pc) == render(tok, messages[:2])
    dev = parse_example(json.dumps({"messages": [{"role": "developer", "content": "Be brief."}, *messages[:2]]}))
    assert dev[0] == {"role": "system", "content": "Be brief."}  # OpenAI's newer name for system, as the server
    ids, mask = render(tok, dev)
    assert tok.decode(ids).startswith("Be brief.\nUser: 2+2?") and "".join(
        tok.decode([i]) for i, m in zip(ids, mask) if m) == f" 4{eos}"


def test_rows_and_batches():
    docs = [Document(list(range(n)), [0] * (n // 2) + [1] * (n - n // 2), i) for i, n in enumerate([9, 5, 4, 3, 7])]
    rows = pack_rows(docs, 10)
    assert sorted(d.line for row in rows for d in row) == list(range(5))  # each document once
    assert all(sum(len(d.ids) - 1 for d in row) <= 10 for row in rows) and len(rows) == 3  # 8+..., 26 positions
    batch = collate(rows, pad_id=99, packed=True, pad_to=12)  # one shape for every packed batch
    B, S = batch["input_ids"].shape
    assert (B, S) == (3, 12) and collate(rows, 99, True)["input_ids"].shape == (3, 10)
    for b, row in enumerate(rows):
        at = 0
        for k, d in enumerate(row):
            n = len(d.ids) - 1
            assert batch["positions"][b, at:at + n].tolist() == list(range(n))  # restart per document
            assert batch["doc_ids"][b, at:at + n].tolist() == [k] * n
            want = [t if m else IGNORE for t, m in zip(d.ids[1:], d.mask[1:])]
            assert batch["targets"][b, at:at + n].tolist() == want  # loss only on assistant targets
            at += n
        assert (batch["input_ids"][b, at:] == 99).all() and (batch["targets"][b, at:] == IGNORE).all()
        assert (batch["doc_ids"][b, at:] == -1).all()


# ---------------------------------------------------------------------------- packing == alone
def check_packing_equals_alone(device: str, autocast, tol: float, cfg=None, kind: str = "sdpa") -> None:
    """Per-token main and MTP losses of a packed row == each document run alone; not so without the mask."""
    torch.manual_seed(0)
    cfg = cfg or preset("debug")
    model = Transformer.from_config(cfg, device=device, seed=0).eval()
    lengths = [13, 7, 20, 4]
    docs = [Document(torch.randint(2, cfg.vocab_size, (n,)).tolist(), [0] * 3 + [1] * (n - 3), i)
            for i, n in enumerate(lengths)]
    packed = {k: v.to(device) for k, v in collate([docs], pad_id=0, packed=True).items()}  # one row of 40
    mask = install_document_masking(model, kind)
    with torch.no_grad(), autocast:
        mask.set(packed["doc_ids"])
        out = model(packed["input_ids"], positions=packed["positions"], mtp_tokens=packed["targets"].clamp_min(0))
        losses, mtp = token_losses(out.logits, packed["targets"])[0], token_losses(
            out.mtp_logits[0][:, :-1], mtp_targets(packed, 1))[0]
        mask.set(None)  # plain causal: the later documents see the earlier ones
        leaky = token_losses(model(packed["input_ids"], positions=packed["positions"]).logits, packed["targets"])[0]
        at = 0
        for d in docs:
            alone = {k: v.to(device) for k, v in collate([[d]], pad_id=0, packed=False).items()}
            one = model(alone["input_ids"], mtp_tokens=alone["targets"].clamp_min(0))
            n = len(d.ids) - 1
            torch.testing.assert_close(losses[at:at + n], token_losses(one.logits, alone["targets"])[0],
                                       rtol=tol, atol=tol)
            want_mtp = token_losses(one.mtp_logits[0][:, :-1], mtp_targets(alone, 1))[0]
            # the last position's depth-1 target lies in the next document: ignored (0) in the packed row
            torch.testing.assert_close(mtp[at:at + n - 1], want_mtp[:n - 1], rtol=tol, atol=tol)
            if at + n < len(mtp):
                assert mtp[at + n - 1] == 0
            if at and tol <= 1e-4:  # fp32: the mask matters far beyond rounding
                assert not torch.allclose(leaky[at:at + n], losses[at:at + n], atol=1e-3)
            at += n


@pytest.mark.parametrize("kind", ["sdpa", "flex"])
def test_packed_documents_compute_what_they_compute_alone(kind):
    """The SDPA mask (the reference) and FlexAttention's block mask (eager on the CPU) each give every
    document of a packed row the losses it has alone."""
    check_packing_equals_alone("cpu", contextlib.nullcontext(), 1e-5, kind=kind)


def packed_step_gradients(device: str, variants) -> None:
    """Gradients of one packed SFT step agree across (attention kind, activation checkpointing) variants."""
    from nanoseek.sft.loss import sft_loss
    from nanoseek.train.step import accumulate_gradients, enable_activation_checkpointing

    docs = [Document(list(range(2 + i, 2 + i + n)), [0] * 2 + [1] * (n - 2), i) for i, n in enumerate([9, 6, 12])]
    batch = collate(pack_rows(docs, 16), pad_id=0, packed=True)
    grads = []
    for kind, checkpointed in variants:
        model = Transformer.from_config(preset("debug"), device=device, seed=0)
        mask = install_document_masking(model, kind)
        if checkpointed:
            enable_activation_checkpointing(model)
        accumulate_gradients(model, [batch], sft_loss(mask, 0.3, 1e-4, mtp=True), contextlib.nullcontext())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for other in grads[1:]:
        assert grads[0].keys() == other.keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], other[name], rtol=1e-4, atol=1e-5, msg=name)


def test_packed_step_with_activation_checkpointing_matches():
    """Recomputation in backward sees the same document mask (it stays set until the next batch)."""
    packed_step_gradients("cpu", [("sdpa", False), ("sdpa", True)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packing_on_the_gpu(tmp_path, teacher):
    """The CUDA SDPA backends with a boolean mask and compiled FlexAttention (fp32 and bf16 autocast; flex's
    gradients against the SDPA reference's), then a short packed run of each."""
    for kind in ("sdpa", "flex"):  # flex: compiled FlexAttention
        check_packing_equals_alone("cuda", contextlib.nullcontext(), 1e-4, kind=kind)
        check_packing_equals_alone("cuda", torch.autocast("cuda", dtype=torch.bfloat16), 3e-2,
                                   preset("demo", vocab_size=512), kind=kind)
    packed_step_gradients("cuda", [("sdpa", False), ("sdpa", True), ("flex", False), ("flex", True)])
    root, _ = teacher
    for kind in ("sdpa", "flex"):
        summary = run("--ckpt", str(root / "teacher"), "--data", str(root / "chats.jsonl"), "--train.device", "cuda",
                      "--sft.attention", kind, "--train.max_steps", "3", "--train.out_dir", str(tmp_path / kind))
        records = [r for r in read_metrics(tmp_path / kind / "metrics.jsonl") if r["kind"] == "train"]
        assert summary["step"] == 3 and all(r["loss"] == r["loss"] for r in records) and "mfu" in records[-1]


# ---------------------------------------------------------------------------- runs
def test_resume_is_exact_and_checkpoints_are_hf(teacher, tmp_path):
    root, _ = teacher
    common = ["--ckpt", str(root / "teacher"), "--data", str(root / "chats.jsonl"), "--train.max_steps", "4",
              "--train.ckpt_every", "2", "--train.lr", "3e-3", "--train.warmup_steps", "1"]
    run(*common, "--train.out_dir", str(tmp_path / "a"))
    # continue from step 2 into a fresh directory: the same 2 further steps
    run("--resume", str(tmp_path / "a/checkpoints/step-000002"), "--train.out_dir", str(tmp_path / "b"))
    a, b = load_file(tmp_path / "a/checkpoints/step-000004/model.safetensors"), \
        load_file(tmp_path / "b/checkpoints/step-000004/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in read_metrics(tmp_path / "a/metrics.jsonl") if r["kind"] == "train"]
    resumed = [r["loss"] for r in read_metrics(tmp_path / "b/metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 4 and resumed == losses[2:]
    # HF format with the chat template; MTP off by default leaves the MTP weights; the router bias moved
    start = load_file(root / "teacher/model.safetensors")
    mtp_keys = [k for k in a if k.startswith("model.layers.3.")  # debug: 3 layers, the MTP module is layer 3
                and "embed_tokens" not in k and "shared_head.head" not in k]  # copies of the main model's
    assert mtp_keys and all(torch.equal(a[k], start[k]) for k in mtp_keys)
    bias = [k for k in a if k.endswith("e_score_correction_bias") and not k.startswith("model.layers.3.")]
    assert bias and any(a[k].abs().sum() > 0 for k in bias)
    assert load_pretrained(tmp_path / "a/checkpoints/step-000004").config.num_hidden_layers == 3
    saved_tok = json.loads((tmp_path / "a/checkpoints/step-000004/tokenizer_config.json").read_text())
    assert "Assistant" in saved_tok["chat_template"]
    with pytest.raises(SystemExit, match="--sft.seq_len 64"):  # a resumed run keeps its data layout
        run("--resume", str(tmp_path / "a/checkpoints/step-000002"), "--train.out_dir", str(tmp_path / "c"),
            "--sft.seq_len", "64")


def test_master_weights_resume_exactly_and_save_fp32_masters(teacher, tmp_path):
    """`nanoseek sft --train.master_weights true` (bf16 autocast): a resumed run continues bit for bit, and the
    checkpoints hold the fp32 masters (not bf16-representable after training)."""
    root, _ = teacher
    common = ["--ckpt", str(root / "teacher"), "--data", str(root / "chats.jsonl"), "--train.max_steps", "4",
              "--train.ckpt_every", "2", "--train.lr", "3e-3", "--train.warmup_steps", "1", "--train.dtype", "bf16",
              "--train.master_weights", "true"]
    run(*common, "--train.out_dir", str(tmp_path / "a"))
    run("--resume", str(tmp_path / "a/checkpoints/step-000002"), "--train.out_dir", str(tmp_path / "b"))
    a, b = load_file(tmp_path / "a/checkpoints/step-000004/model.safetensors"), \
        load_file(tmp_path / "b/checkpoints/step-000004/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moved = a["model.layers.0.self_attn.o_proj.weight"]
    assert moved.dtype == torch.float32 and not torch.equal(moved, moved.to(torch.bfloat16).float())


def test_distilled_student_from_a_fresh_preset(teacher, tmp_path):
    root, _ = teacher
    run("--preset", "debug", "--model.num_hidden_layers", "2", "--tokenizer", str(root / "teacher"),
        "--data", str(root / "chats.jsonl"), "--sft.epochs", "2", "--sft.mtp", "true", "--train.lr", "1e-2",
        "--train.warmup_steps", "2", "--sft.pack", "false", "--sft.val_examples", "3",
        "--train.out_dir", str(tmp_path / "student"))
    records = [r for r in read_metrics(tmp_path / "student/metrics.jsonl") if r["kind"] == "train"]
    assert len(records) == 12  # 12 padded rows (3 held out) in batches of 2: 6 batches per epoch, 2 epochs
    assert sum(r["loss"] for r in records[-4:]) / 4 < 0.7 * records[0]["loss"] and "mtp_loss" in records[0]
    ckpt = sorted((tmp_path / "student/checkpoints").iterdir())[-1]
    summary = json.loads((tmp_path / "student/summary.json").read_text())
    first_val = [r for r in read_metrics(tmp_path / "student/metrics.jsonl") if r["kind"] == "val"]
    assert 0 < summary["val_loss"] < records[0]["loss"] and first_val[-1]["loss"] == summary["val_loss"]
    student = load_pretrained(ckpt)
    assert student.config.num_hidden_layers == 2 and student.config.vocab_size == teacher[1].vocab_size


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 2|:2: 'messages' has no assistant turn"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     ":2: messages\\[0\\].role 'tool' is unknown"),
    ("{not json", ":2: not valid JSON"),
    ({"prompt": "only a prompt"}, ":2: 'completion' must be a string"),
    ({"text": "pretraining text"}, ":2: no 'messages' and no 'prompt'/'completion'"),
])
def test_bad_lines_are_named(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    f.write_text(good + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n" + good + "\n")
    with pytest.raises(SFTDataError, match=message):
        read_examples(f)


def test_bad_runs_are_refused_with_the_fix(teacher, tmp_path):
    root, _ = teacher
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match="empty.jsonl: holds no examples"):
        run("--ckpt", str(root / "teacher"), "--data", str(tmp_path / "empty.jsonl"), "--train.out_dir",
            str(tmp_path / "e"))
    no_template = tmp_path / "no_template"
    no_template.mkdir()
    for f in (root / "teacher").iterdir():
        (no_template / f.name).write_bytes(f.read_bytes())
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="has no chat template.*--sft.chat_template r1"):
        run("--ckpt", str(no_template), "--data", str(root / "chats.jsonl"), "--train.out_dir", str(tmp_path / "t"))
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.sft.loop import chat_tokenizer, write_tokenizer

    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()  # refused runs leave nothing behind
    fixed = load_tokenizer(write_tokenizer(chat_tokenizer(no_template, "r1"), tmp_path / "r1"))  # the fix named
    assert render(fixed, parse_example(json.dumps({"prompt": "q", "completion": "a"})))[1][-1] == 1
    with pytest.raises(SFTDataError, match=r"bad.jsonl:1: .*system \(first only\)"):  # the template's own check
        render_all(fixed, [(1, [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                                {"role": "assistant", "content": "a"}])], "bad.jsonl", 64)
    with pytest.raises(SystemExit, match="not both and not neither"):
        run("--ckpt", str(root / "teacher"), "--preset", "debug", "--data", str(root / "chats.jsonl"))
    with pytest.raises(SystemExit, match="--model.hidden_size: a checkpoint fixes"):
        run("--ckpt", str(root / "teacher"), "--model.hidden_size", "32", "--data", str(root / "chats.jsonl"),
            "--train.out_dir", str(tmp_path / "m"))
    with pytest.raises(SystemExit, match="flex trains on CUDA only"):
        run("--ckpt", str(root / "teacher"), "--data", str(root / "chats.jsonl"), "--sft.attention", "flex",
            "--train.out_dir", str(tmp_path / "f"))
    with pytest.raises(SystemExit, match="--sft.attention 'xla': must be 'sdpa' or 'flex'"):
        parse_args(["--sft.attention", "xla"])
    with pytest.raises(SystemExit, match="did you mean --sft.epochs"):
        parse_args(["--sft.epoch", "2"])
    from nanoseek.cli import main

    with pytest.raises(SystemExit, match="--data FILE is required"):  # `nanoseek sft` reaches the loop
        main(["sft", "--ckpt", str(root / "teacher"), "--train.out_dir", str(tmp_path / "d")])
