"""`nanoseek generate | chat | serve` entry points on a tiny checkpoint."""

from __future__ import annotations

import io
import re
import shlex
import shutil
from pathlib import Path

import httpx
import pytest
from server_fixtures import running
from test_infer_fixtures import single_thread, write_tiny_ckpt

import nanoseek
from nanoseek.cli import main
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.cli import chat_main, generate_main, resolve_ckpt, serve_main

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


# ---------------------------------------------------------------------------- issue 20: run directories,
# the README's commands as written, warnings and errors, BOS, serve's access and limit options
ROOT = Path(__file__).resolve().parents[1]


def fake_demo_run(tiny_ckpt: str, where: Path) -> Path:
    """runs/demo as `nanoseek train` leaves it: checkpoints/step-*; the older one is unreadable, so
    loading it would fail (the latest must be the one used)."""
    steps = where / "runs" / "demo" / "checkpoints"
    shutil.copytree(tiny_ckpt, steps / "step-000800")
    shutil.copytree(tiny_ckpt, steps / "step-000250")
    (steps / "step-000250" / "model.safetensors").write_bytes(b"not weights")
    (steps / ".step-000900.tmp-abc").mkdir()  # a killed run's leftover: ignored
    return steps / "step-000800"


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.split("  #")[0].strip() for line in lines
            if re.match(r"nanoseek (generate|chat|serve) ", line)]


def test_the_readmes_inference_commands_run_as_written(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Each README command line, verbatim (comments aside), from a directory holding runs/demo."""
    latest = fake_demo_run(tiny_ckpt, tmp_path)
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert {c.split()[1] for c in commands} == {"generate", "chat", "serve"}, commands
    served = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    for command in commands:
        argv = shlex.split(command)[1:]
        assert main(argv) == 0, command
        err = capsys.readouterr().err
        assert f"using its latest checkpoint, {Path('runs/demo/checkpoints/step-000800')}" in err, command
    assert served["port"] == 8000 and served["app"].state.scheduler.engine.model is not None
    with running(served["app"]) as url:
        assert httpx.get(url + "/v1/models/demo").json()["id"] == "demo"  # the run's name, not step-000800
    assert latest.is_dir()


def test_ckpt_resolution_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="neither a checkpoint .* nor a run directory"):
        resolve_ckpt(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no such directory"):
        resolve_ckpt(tmp_path / "missing")


def test_cuda_graph_on_cpu_warns_and_max_len_is_checked(tiny_ckpt, capsys):
    with pytest.warns(UserWarning, match="--cuda-graph does nothing on --device cpu"):
        assert generate_main(["--ckpt", tiny_ckpt, "--prompt", "Pack", "--max-new-tokens", "2", "--device", "cpu",
                              "--cuda-graph"]) == 0
    with pytest.raises(SystemExit, match="--max-len 100000 exceeds the model's max_position_embeddings=512"):
        generate_main(["--ckpt", tiny_ckpt, "--prompt", "x", "--device", "cpu", "--max-len", "100000"])
    with pytest.raises(SystemExit, match="--max-len 1: the context must hold"):
        generate_main(["--ckpt", tiny_ckpt, "--prompt", "x", "--device", "cpu", "--max-len", "1"])


def test_generate_adds_the_tokenizers_bos_to_raw_prompts_not_to_chat(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """A tokenizer whose post-processor adds BOS: raw prompts reach the engine with it (as transformers
    encodes them), chat prompts as the template renders them (the template writes its own specials)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    folder = tmp_path / "bos"
    shutil.copytree(tiny_ckpt, folder)
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    hf.post_processor = processors.TemplateProcessing(single="<|end_of_text|> $A",
                                                      special_tokens=[("<|end_of_text|>", 0)])
    hf.save(str(folder / "tokenizer.json"))
    tok = load_tokenizer(folder)
    seen = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, prompts, *a, **k: (seen.append(prompts),
                                                                            real(self, prompts, *a, **k))[1])
    assert generate_main(["--ckpt", str(folder), "--prompt", "Pack my", "--max-new-tokens", "4",
                          "--device", "cpu"]) == 0
    assert generate_main(["--ckpt", str(folder), "--prompt", "hi", "--chat", "--max-new-tokens", "4",
                          "--device", "cpu"]) == 0
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert seen == [[[0, *tok.encode("Pack my")]], [tok.encode(chat)]]
    assert tok.encode_prompt("Pack my") == [0, *tok.encode("Pack my")]


def test_serve_options_reach_the_app(tiny_ckpt, monkeypatch, capsys):
    served = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setenv("NANOSEEK_API_KEY", "from-env")
    assert serve_main(["--ckpt", tiny_ckpt, "--device", "cpu", "--max-n", "2", "--max-body-bytes", "5000",
                       "--allowed-hosts", "localhost, 127.0.0.1"]) == 0
    assert "API key required" in capsys.readouterr().err
    app = served["app"]
    assert app.state.limits.max_n == 2 and app.state.limits.max_body_bytes == 5000
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/v1/models").status_code == 401
        key = {"authorization": "Bearer from-env"}
        assert http.get("/v1/models", headers=key).status_code == 200
        assert http.get("/v1/models", headers={**key, "host": "elsewhere"}).status_code == 400
        r = http.post("/v1/completions", headers=key, json={"model": "tiny-model", "prompt": "x", "n": 3})
        assert r.status_code == 400 and r.json()["error"]["code"] == "max_n"
    with pytest.raises(SystemExit, match="--max-stop: max_stop=0: must be an integer >= 1"):
        serve_main(["--ckpt", tiny_ckpt, "--device", "cpu", "--max-stop", "0"])


def test_serve_help_documents_access_and_limits(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ["--api-key", "--allowed-hosts", "--max-body-bytes", "--max-prompt-chars", "--max-stop-chars"]:
        assert flag in text
