"""`nanoseek generate`, `nanoseek chat` and `nanoseek serve`: inference from a checkpoint directory.

    nanoseek generate --ckpt runs/demo --prompt "What is 12+34?" --chat
    nanoseek generate --ckpt runs/demo --prompts-file prompts.txt --temperature 0.7 --seed 0 --speculative 2
    nanoseek chat --ckpt runs/demo
    nanoseek serve --ckpt runs/demo --host 127.0.0.1 --port 8000 [--api-key KEY] [--max-body-bytes N ...]

--ckpt takes a checkpoint directory: config.json + safetensors (`nanoseek.save_pretrained`) and
tokenizer.json + tokenizer_config.json (`nanoseek.data.tokenizer`); a Hugging Face DeepSeek-V2/V3
model directory works too. A training run directory (`--train.out_dir`, holding
checkpoints/step-*) means its latest checkpoint.

Raw prompts are tokenized as transformers does (`Tokenizer.encode_prompt`: the tokenizer's own
special tokens, e.g. a BOS); chat prompts are rendered by the chat template, which writes its
special tokens itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import warnings
from pathlib import Path

import torch

import nanoseek
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser(prog: str, description: str, temperature: float | None) -> argparse.ArgumentParser:
    """Model options, and sampling options with this default temperature (None: no sampling options)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json), "
                   "or a training run directory: its latest checkpoint")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to run on, e.g. cpu, cuda, cuda:1")
    m.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weight and cache dtype; auto: bfloat16 on a GPU, float32 on the CPU")
    m.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    m.add_argument("--max-len", type=int, default=None,
                   help="context length in tokens (prompt + new); default: the model's max_position_embeddings. "
                   "The cache holds max-batch-size x max-len positions (its size is printed at start)")
    m.add_argument("--speculative", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="MTP speculative decoding with K draft tokens per step (bare flag: K=1; 0: off)")
    m.add_argument("--cuda-graph", action="store_true",
                   help="replay decode steps (plain or speculative) and prefills as CUDA graphs (GPU only)")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile each block: fewer, fused kernels per decode step (GPU; first call is slow)")
    if temperature is None:
        return p
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    s.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per answer at most")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    s.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    return p


def _sampling(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e} (see --help)") from None


def resolve_ckpt(path: str | Path) -> Path:
    """The checkpoint a --ckpt names: a model directory (config.json) as it is; a training run
    directory, or its checkpoints/ folder, means its latest step-* checkpoint (said on stderr)."""
    path = Path(path)
    if not path.is_dir():
        raise SystemExit(f"error: --ckpt {path}: no such directory (give a checkpoint written by nanoseek train, "
                         "its run directory, or a Hugging Face model directory)")
    if (path / "config.json").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = [(int(m.group(1)), d) for d in root.iterdir()
             if (m := re.fullmatch(r"step-(\d+)", d.name)) and (d / "config.json").is_file()]
    if not steps:
        raise SystemExit(f"error: --ckpt {path}: neither a checkpoint (no config.json) nor a run directory with "
                         f"checkpoints/step-*; train one (nanoseek train --train.out_dir {path}) or point at a "
                         "checkpoint or Hugging Face model directory")
    latest = max(steps)[1]
    print(f"--ckpt {path}: using its latest checkpoint, {latest}", file=sys.stderr)
    return latest


def load_engine(args: argparse.Namespace) -> Engine:
    """Model, tokenizer and Engine from the parsed --ckpt/--device/--dtype/... options."""
    from nanoseek.data.tokenizer import load_tokenizer

    ckpt = resolve_ckpt(args.ckpt)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: CUDA is not available here; use --device cpu")
    if args.max_len is not None and args.max_len < 2:
        raise SystemExit(f"error: --max-len {args.max_len}: the context must hold a prompt token and a new one")
    cuda_graph = args.cuda_graph
    if cuda_graph and not args.device.startswith("cuda"):
        warnings.warn(f"--cuda-graph does nothing on --device {args.device} (CUDA graphs need a GPU); "
                      "decoding runs eagerly", stacklevel=2)
        cuda_graph = False
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    try:
        tokenizer = load_tokenizer(ckpt)
        model = nanoseek.load_pretrained(str(ckpt), dtype=dtype, device=args.device)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"{ckpt}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"vocab_size={model.config.vocab_size}; pair the checkpoint with its own tokenizer")
        limit = model.config.max_position_embeddings
        if args.max_len is not None and args.max_len > limit:
            raise ValueError(f"--max-len {args.max_len} exceeds the model's max_position_embeddings={limit} "
                             f"(positions it was built for); use --max-len {limit} or less")
        engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_len=args.max_len,
                        speculative=args.speculative, cuda_graph=cuda_graph, compile=args.compile)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(engine.cache_report(), file=sys.stderr)
    return engine


def generate_main(argv: list[str]) -> int:
    """`nanoseek generate`: complete prompts in one batch, print the outputs and a stats line."""
    p = _parser("nanoseek generate", "Generate text for one or more prompts (batched) from a checkpoint.",
                temperature=0.0)
    src = p.add_argument_group("prompts (at least one of)")
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    src.add_argument("--prompts-file", help="text file with one prompt per line (empty lines skipped)")
    src.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the tokenizer's chat template")
    args = p.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise SystemExit(f"error: --prompts-file: {e}") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        p.error("give --prompt TEXT or --prompts-file FILE")
    params = _sampling(args)
    engine = load_engine(args)
    tok = engine.tokenizer  # chat: the template writes its special tokens; raw: the tokenizer's rules (BOS)
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) if args.chat
           else tok.encode_prompt(q) for q in prompts]
    try:
        outputs = engine.generate(ids, params)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        if len(prompts) > 1:
            print(f"=== [{i}] {prompt}")
        print(out.text if len(prompts) > 1 or args.chat else prompt + out.text)
    print(engine.last_stats.summary(), file=sys.stderr)
    return 0


def chat_main(argv: list[str]) -> int:
    """`nanoseek chat`: an interactive conversation, streaming the answer as it is generated."""
    p = _parser("nanoseek chat", "Chat with a checkpoint in the terminal. The conversation is rendered "
                "with the chat template of the checkpoint's tokenizer_config.json (the R1 layout if it has "
                "none). Commands: /reset forgets the conversation, /exit (or Ctrl-D) quits.", temperature=0.7)
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    args = p.parse_args(argv)
    params = _sampling(args)
    engine = load_engine(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print("nanoseek chat: /reset forgets the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = _fit_history(engine, history, len(start), params.max_new_tokens)
        if prompt is None:
            print(f"error: this message does not fit the context of {engine.max_len} tokens with "
                  f"--max-new-tokens {params.max_new_tokens}; /reset or send a shorter one", file=sys.stderr)
            history.pop()
            continue
        answer = []
        try:
            for delta in engine.stream(prompt, params):
                answer.append(delta)
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(answer)})


def _fit_history(engine: Engine, history: list[dict], keep: int, max_new: int) -> str | None:
    """Render the conversation, dropping the oldest turns (after the first `keep`) until the prompt
    and max_new tokens fit the context; None if even the last message alone does not fit."""
    while True:
        prompt = engine.tokenizer.apply_chat_template(history)
        if len(engine.tokenizer.encode(prompt)) + max_new <= engine.max_len:
            return prompt
        if len(history) - keep <= 1:
            return None
        del history[keep]


def serve_main(argv: list[str]) -> int:
    """`nanoseek serve`: the OpenAI-compatible HTTP server (see nanoseek.infer.server)."""
    p = _parser("nanoseek serve", "Serve a checkpoint over an OpenAI-compatible HTTP API: GET /v1/models, "
                "POST /v1/completions and /v1/chat/completions (stream: true for server-sent events). "
                "Concurrent requests are batched together (continuous batching); each request sets its own "
                "sampling (temperature, top_p, top_k, seed, stop, max_tokens).", temperature=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the --ckpt folder name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level")
    a = p.add_argument_group("access")
    a.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: the env NANOSEEK_API_KEY; unset: open)")
    a.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST...]",
                   help="Host header names clients may use, e.g. localhost,127.0.0.1 (guards against DNS "
                   "rebinding; default: any)")
    from nanoseek.infer.protocol import Limits

    lim = p.add_argument_group("limits (each answered with a 400, 413 for the body or 429 for the queue, naming it)")
    for f in dataclasses.fields(Limits):
        lim.add_argument(Limits.flag(f.name), type=int, default=f.default, help=f.metadata["help"])
    args = p.parse_args(argv)
    import uvicorn

    from nanoseek.infer.server import create_app

    try:
        limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    except ValueError as e:
        raise SystemExit(f"error: {Limits.flag(str(e).split('=')[0])}: {e}") from None
    args.api_key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None  # not a default: --help would show it
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None
    engine = load_engine(args)
    name = args.model_name or Path(args.ckpt).resolve().name
    app = create_app(engine, name, limits, api_key=args.api_key, allowed_hosts=hosts)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
