"""Where completions come from: the project's engine on a checkpoint, or any OpenAI-compatible server.

Both backends answer the same call, `complete(prompts, n, temperature, top_p, max_tokens, seed)`, with
n texts per prompt, cut by the same rule (`cut_at_stop`): everything up to and including the first
`</answer>`. The engine stops there itself; a remote server is asked for no stop string (OpenAI drops
the stop string from the text, and "stop" also means EOS, so the answer tag could not be restored),
and its text is cut on this side. Greedy results of the two therefore agree token for token.

Prompts are encoded as the server encodes a raw prompt (`tokenizer.encode_prompt`: the tokenizer's own
special-token rules), so a local run sees exactly what a served model sees.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nanoseek.rl.rollout import STOP


def cut_at_stop(text: str, stop: str = STOP) -> str:
    """The text through the first `stop` (kept, so the R1 format can be checked), else all of it."""
    i = text.find(stop)
    return text if i < 0 else text[:i + len(stop)]


def resolve_ckpt(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's latest step-* checkpoint (as `nanoseek generate` resolves it)."""
    from nanoseek.infer.cli import resolve_ckpt as resolve

    return resolve(path)


def ckpt_step(path: Path) -> int | None:
    """The training step a checkpoint was written at (its manifest.json, else a step-NNNNNN directory name),
    None if unknown (e.g. a plain save_pretrained directory)."""
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            return int(json.loads(manifest.read_text()).get("step"))
        except (ValueError, TypeError):
            pass
    m = re.fullmatch(r"step-(\d+)", path.name)
    return int(m[1]) if m else None


class EngineBackend:
    """Completions on the project's Engine over a checkpoint (greedy when temperature == 0)."""

    def __init__(self, ckpt: str | Path, device: str = "auto", max_batch_size: int = 64, dtype: str = "auto",
                 cuda_graph: bool = False):
        import torch

        from nanoseek.data.tokenizer import load_tokenizer
        from nanoseek.hf import load_pretrained
        from nanoseek.infer.engine import Engine

        self.path = resolve_ckpt(ckpt)
        if not (self.path / "tokenizer.json").is_file():
            raise SystemExit(f"{self.path} has no tokenizer.json: evaluation decodes and scores text; copy the "
                             "tokenizer the model was trained with next to its weights")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available here; use --device cpu")
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if dtype not in ("auto", *dtypes):
            raise SystemExit(f"--dtype {dtype!r}: use auto, float32 or bfloat16")
        torch_dtype = dtypes.get(dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        self.tokenizer = load_tokenizer(self.path)
        model = load_pretrained(self.path, dtype=torch_dtype, device=device).eval()
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise SystemExit(f"{self.path}: the tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}; pair the checkpoint with its own tokenizer")
        self.engine = Engine(model, self.tokenizer, max_batch_size=max_batch_size,
                             max_len=model.config.max_position_embeddings,
                             # fp32 decode is not capturable (its experts loop with host syncs): eager there
                             cuda_graph=cuda_graph and device.startswith("cuda") and torch_dtype == torch.bfloat16)
        self.name = str(self.path)

    def encode(self, prompt: str) -> list[int]:
        return getattr(self.tokenizer, "encode_prompt", self.tokenizer.encode)(prompt)

    def complete(self, prompts: list[str], n: int, *, temperature: float, top_p: float, max_tokens: int,
                 seed: int) -> list[list[str]]:
        """n texts per prompt (cut at the stop); prompt i's choice j draws with seed + i * n + j (on servers that
        add j to a request's seed, as this project's does)."""
        from nanoseek.infer.engine import ContextLengthError
        from nanoseek.infer.sampling import SamplingParams

        params = [SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, stop=(STOP,),
                                 seed=None if temperature == 0 else seed + i * n) for i in range(len(prompts))]
        try:
            outs = self.engine.generate([self.encode(p) for p in prompts], params, n=n)
        except ContextLengthError as e:
            raise SystemExit(f"{e}; lower --max-new-tokens") from None
        eos = self.engine.eos_id
        texts = [cut_at_stop(self.tokenizer.decode([t for t in o.token_ids if t != eos])) for o in outs]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


@dataclass
class HTTPBackend:
    """Completions from an OpenAI-compatible server's /v1/completions (`url` ends in /v1)."""

    url: str
    model: str
    api_key: str = ""
    timeout: float = 600.0
    concurrency: int = 8

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise SystemExit(f"--url {self.url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000/v1")
        if not self.model:
            raise SystemExit("--url needs --model NAME: the model id the server serves (GET /v1/models lists it)")
        self.url = self.url.rstrip("/")
        self.name = f"{self.url} ({self.model})"

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + "/completions", json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            raise SystemExit(f"{self.url}/completions answered {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise SystemExit(f"cannot reach {self.url}/completions ({e.reason}); is the server running?") from None

    def complete(self, prompts: list[str], n: int, *, temperature: float, top_p: float, max_tokens: int,
                 seed: int) -> list[list[str]]:
        def one(i: int) -> list[str]:  # one request per prompt: its n choices share one prefill
            body = {"model": self.model, "prompt": prompts[i], "n": n, "temperature": temperature, "top_p": top_p,
                    "max_tokens": max_tokens}
            if temperature > 0:
                body["seed"] = seed + i * n
            choices = sorted(self._post(body)["choices"], key=lambda c: c["index"])
            if len(choices) != n:
                raise SystemExit(f"{self.url} returned {len(choices)} choices for n={n}")
            return [cut_at_stop(c["text"]) for c in choices]

        # concurrent requests: the server batches them; each prompt's seed fixes its samples, whatever the order
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(one, range(len(prompts))))
