"""Shared helpers for the inference tests: tiny models with clear margins and a tiny checkpoint.

Each test file imports these plain functions and registers the fixtures it needs (so no fixture
leaks into other test files).

Random tiny weights give logits and router scores that lie close together, where the few-ulp
differences between the absorbed and the expanded MLA paths could flip an argmax or an expert
choice. `tiny_model` scales the output head and the router weights so that margins are far
above fp32 rounding, and can make the MTP module agree with the main model (`mtp_agree`):
embeddings scaled up make the residual stream mostly the token's embedding, and an identity
eh_proj on the embedding half makes the MTP module see the same thing one token on, so drafts
get accepted often (with random weights nearly every draft is rejected).
"""

from __future__ import annotations

from pathlib import Path

import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.model.transformer import Transformer

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
TEXTS = [
    "The quick brown fox jumps over the lazy dog. 12 + 34 = 46, 7 * 8 = 56.",
    "Une phrase en français avec des accents: é, è, à, ç. Ünïcödé and emoji 🙂 too.",
    "User: what is 3 + 4?\nAssistant: <think> 3 plus 4 is 7 </think> <answer> 7 </answer>",
    "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow.",
] * 20


@torch.no_grad()
def tiny_model(seed: int = 0, mtp_agree: float = 0.0, head_scale: float = 10.0, **overrides) -> Transformer:
    """A debug-preset model (YaRN on, MoE layers, one MTP module), fp32, with wide margins.

    head_scale multiplies the output head (sharper distributions); mtp_agree > 0 scales the
    embeddings by it and sets eh_proj to pass the embedding through.
    """
    cfg = preset("debug", rope_scaling=YARN, **overrides)
    model = Transformer.from_config(cfg, seed=seed).eval()
    model.lm_head.weight.mul_(head_scale)
    for moe in model.moe_layers:
        moe.gate.weight.mul_(10)
    if mtp_agree:
        model.embed_tokens.weight.mul_(mtp_agree)
        D = cfg.hidden_size
        for layer in model.mtp:
            layer.eh_proj.weight.zero_()
            layer.eh_proj.weight[:, :D] = torch.eye(D)
    return model


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def single_thread():
    """Fixture body (each test file registers it, autouse): tiny ops run fastest on one thread and
    then do not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tiny_ckpt(path: Path) -> str:
    """A checkpoint directory: tiny model (vocab = the tokenizer's) + a trained byte-level BPE."""
    from nanoseek.data.tokenizer import train_tokenizer

    path = path / "tiny-model"
    tok = train_tokenizer(TEXTS, vocab_size=320, out_dir=path)
    nanoseek.save_pretrained(tiny_model(vocab_size=tok.vocab_size), path)
    return str(path)
