"""`nanoseek generate | chat | serve` entry points on a tiny checkpoint."""

from __future__ import annotations

import io

import pytest
from test_infer_fixtures import single_thread, write_tiny_ckpt

import nanoseek
from nanoseek.cli import main
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.cli import chat_main, generate_main

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    return write_tiny_ckpt(tmp_path_factory.mktemp("ckpt"))


def expected(ckpt: str, prompts: list[str], max_new: int) -> list[str]:
    """Greedy texts from the engine directly."""
    engine = Engine(nanoseek.load_pretrained(ckpt), load_tokenizer(ckpt))
    return [c.text for c in engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new))]


def test_generate_prompts_and_file(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("Pack my box\n\nThe quick\n")
    argv = ["--ckpt", tiny_ckpt, "--prompt", "12 + 34", "--prompts-file", str(tmp_path / "prompts.txt"),
            "--max-new-tokens", "12", "--device", "cpu"]
    assert generate_main(argv) == 0
    out, err = capsys.readouterr()
    texts = expected(tiny_ckpt, ["12 + 34", "Pack my box", "The quick"], 12)
    assert out == "".join(f"=== [{i}] {p}\n{t}\n" for i, (p, t) in
                          enumerate(zip(["12 + 34", "Pack my box", "The quick"], texts)))
    assert "tok/s" in err and "latent 640 B" in err


def test_generate_speculative_via_main(tiny_ckpt, capsys):
    assert main(["generate", "--ckpt", tiny_ckpt, "--prompt", "Pack my", "--max-new-tokens", "10",
                 "--speculative", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out == "Pack my" + expected(tiny_ckpt, ["Pack my"], 10)[0] + "\n"  # greedy: same text
    assert "acceptance" in err and "tokens per main-model forward" in err


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "/no/such/dir", "--prompt", "x"], "no such directory"),
    (["--prompt", "x", "--temperature", "-1"], "temperature=-1.0: must be 0 \\(greedy\\)"),
    (["--prompt", "x", "--max-new-tokens", "100000"], "exceeds the context"),
])
def test_generate_errors_name_the_problem(tiny_ckpt, argv, message):
    argv = argv if "--ckpt" in argv else ["--ckpt", tiny_ckpt, *argv]
    with pytest.raises(SystemExit, match=message):
        generate_main([*argv, "--device", "cpu"])


def test_generate_needs_a_prompt(tiny_ckpt, capsys):
    with pytest.raises(SystemExit) as info:
        generate_main(["--ckpt", tiny_ckpt])
    assert info.value.code == 2 and "--prompt TEXT or --prompts-file" in capsys.readouterr().err


def test_chat_streams_and_keeps_history(tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nWhat is 3 + 4?\n\n/reset\nBye\n"))
    args = ["--ckpt", tiny_ckpt, "--temperature", "0", "--max-new-tokens", "8", "--system", "Be brief.",
            "--device", "cpu"]
    assert chat_main(args) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(tiny_ckpt)
    system = {"role": "system", "content": "Be brief."}
    turn1 = [system, {"role": "user", "content": "Hello there"}]
    (a1,) = expected(tiny_ckpt, [tok.apply_chat_template(turn1)], 8)
    turn2 = [*turn1, {"role": "assistant", "content": a1}, {"role": "user", "content": "What is 3 + 4?"}]
    turn3 = [system, {"role": "user", "content": "Bye"}]  # /reset forgot the first two turns
    a2, a3 = expected(tiny_ckpt, [tok.apply_chat_template(turn2), tok.apply_chat_template(turn3)], 8)
    assert out == f">>> {a1}\n>>> {a2}\n>>> >>> >>> {a3}\n>>> \n"


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--ckpt" in text and "--dtype" in text and ("--port" in text) == (command == "serve")
