"""Hugging Face checkpoint load/save for DeepSeek-V2/V3. All name mapping lives here.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Names (HF -> nanoseek):

    model.embed_tokens.weight                         -> embed_tokens.weight
    model.norm.weight, lm_head.weight                 -> norm.weight, lm_head.weight
    model.layers.{i}.<rest>          (i < L)          -> layers.{i}.<rest>
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight -> layers.{i}.mlp.experts.w13[e, :I]
                                 ....up_proj.weight   -> layers.{i}.mlp.experts.w13[e, I:]
                                 ....down_proj.weight -> layers.{i}.mlp.experts.w2[e]
    model.layers.{L+k}.<rest>                         -> mtp.{k}.<rest>   (MTP module k)
    model.layers.{L+k}.embed_tokens / shared_head.head: copies of the shared embedding / head

FP8 checkpoints (DeepSeek-V3/R1 releases) store e4m3 weights with a `weight_scale_inv` per
linear: one fp32 scale per 128x128 block; they are dequantised (w * scale) on load.
Every key must be used and every weight filled: anything else is an error naming key and file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.model.common import Linear
from nanoseek.model.transformer import Transformer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the key, the file and the fix."""


# ---------------------------------------------------------------------------- reading
def read_config(path: str | Path) -> ModelConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; a checkpoint directory needs config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    return ModelConfig.from_hf_dict(raw, source=str(config_file))


def checkpoint_files(path: str | Path) -> dict[str, list[str]]:
    """{safetensors file: [keys]} for a single-file or sharded checkpoint."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map'")
        files: dict[str, list[str]] = defaultdict(list)
        for key, fname in weight_map.items():
            files[fname].append(key)
        for fname in files:
            if not (path / fname).is_file():
                raise CheckpointError(f"{path / fname}: listed in {INDEX_NAME} but missing")
        return dict(files)
    single = path / SINGLE_NAME
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {SINGLE_NAME: list(f.keys())}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weights (*.bin/*.pt) found; nanoseek loads safetensors "
                              "only (convert with transformers' save_pretrained(safe_serialization=True))")
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """e4m3 weight (O, I) with per-128x128-block scales (ceil(O/128), ceil(I/128)) -> fp32."""
    O, I = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:O].repeat_interleave(block, 1)[:, :I]
    return weight.float() * scale


def hf_to_local(name: str, n_layers: int) -> tuple[str, int | None, str | None]:
    """Map an HF key to (nanoseek parameter name, expert index, expert part) — part in gate/up/down."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None, None
    if name == "model.norm.weight":
        return "norm.weight", None, None
    if name == "lm_head.weight":
        return "lm_head.weight", None, None
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if not m:
        return "", None, None
    i, rest = int(m.group(1)), m.group(2)
    prefix = f"layers.{i}" if i < n_layers else f"mtp.{i - n_layers}"
    e = _EXPERT.match(rest)
    if e:
        param = "w2" if e.group(2) == "down_proj" else "w13"
        return f"{prefix}.mlp.experts.{param}", int(e.group(1)), e.group(2)
    return f"{prefix}.{rest}", None, None


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> Transformer:
    """Load a checkpoint directory into a new `Transformer` (dtype None: the checkpoint's)."""
    path = Path(path)
    cfg = read_config(path)
    files = checkpoint_files(path)
    if cfg.num_nextn_predict_layers:
        mtp_prefixes = tuple(f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers))
        if not any(k.startswith(mtp_prefixes) for keys in files.values() for k in keys):
            # transformers drops MTP weights when it saves; the model is whole without them
            warnings.warn(f"{path}: config.json declares num_nextn_predict_layers="
                          f"{cfg.num_nextn_predict_layers} but the checkpoint has no MTP weights; "
                          "loading without MTP modules", stacklevel=3)
            cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()  # buffers (rope, load counters); every weight is overwritten below
    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    filled: dict[str, int] = defaultdict(int)  # param name -> number of pieces written
    untied: dict[str, torch.Tensor] = {}  # mtp copies of embed / head, checked at the end
    ckpt_dtype = None
    I = cfg.moe_intermediate_size

    for fname, keys in files.items():
        with safe_open(path / fname, "pt", device="cpu") as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise CheckpointError(f"{path / fname}: key {key!r} listed in the index is not in the file")
                if key.endswith("weight_scale_inv"):
                    if key[: -len("_scale_inv")] not in present:
                        raise CheckpointError(f"{path / fname}: {key!r} has no matching weight in the same file")
                    continue
                tensor = f.get_tensor(key)
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_key = key[: -len("weight")] + "weight_scale_inv"
                    if scale_key not in present:
                        raise CheckpointError(f"{path / fname}: FP8 weight {key!r} has no {scale_key!r}")
                    tensor = dequantize_fp8(tensor, f.get_tensor(scale_key))
                elif ckpt_dtype is None and tensor.is_floating_point() and "gate." not in key:
                    ckpt_dtype = tensor.dtype
                local, expert, part = hf_to_local(key, cfg.num_hidden_layers)
                if local.startswith("mtp.") and local.endswith(("embed_tokens.weight", "shared_head.head.weight")):
                    untied[local] = tensor
                    continue
                if local not in params:
                    raise CheckpointError(f"{path / fname}: unexpected key {key!r} (no such weight in a "
                                          f"{cfg.model_type} model with this config.json)")
                target = params[local]
                if expert is not None:
                    if expert >= cfg.n_routed_experts:
                        raise CheckpointError(f"{path / fname}: {key!r} names expert {expert} but "
                                              f"n_routed_experts={cfg.n_routed_experts}")
                    rows = {"gate_proj": slice(0, I), "up_proj": slice(I, 2 * I), "down_proj": slice(None)}[part]
                    target = target.data[expert, rows]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(f"{path / fname}: {key!r} has shape {tuple(tensor.shape)}, the model "
                                          f"expects {tuple(target.shape)} (check config.json)")
                with torch.no_grad():
                    target.copy_(tensor)
                filled[local] += 1

    pieces = {"experts.w13": 2 * cfg.n_routed_experts, "experts.w2": cfg.n_routed_experts}
    missing = [name for name in params
               if filled[name] != next((n for suffix, n in pieces.items() if name.endswith(suffix)), 1)]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks weights for {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    _attach_mtp_copies(model, untied, path)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    target_dtype = dtype or ckpt_dtype or torch.float32
    model.to_dtype(target_dtype)
    return model


def _attach_mtp_copies(model: Transformer, copies: dict[str, torch.Tensor], path: Path) -> None:
    """Keep MTP modules tied to the main embedding/head when the stored copies equal them."""
    for name, tensor in copies.items():
        k = int(name.split(".")[1])
        layer = model.mtp[k]
        shared = model.embed_tokens.weight if name.endswith("embed_tokens.weight") else model.lm_head.weight
        if tensor.shape != shared.shape:
            raise CheckpointError(f"{path}: MTP weight for {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(shared.shape)}")
        if torch.equal(tensor.to(shared.device, shared.dtype), shared.data):
            continue
        if name.endswith("embed_tokens.weight"):
            layer.embed_tokens = torch.nn.Embedding(*tensor.shape, device=shared.device)
            layer.embed_tokens.weight.data.copy_(tensor)
        else:
            layer.shared_head.head = Linear(tensor.shape[1], tensor.shape[0], bias=False, device=shared.device)
            layer.shared_head.head.weight.data.copy_(tensor)


# ---------------------------------------------------------------------------- writing
def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, experts unstacked, MTP copies included."""
    cfg, L, I = model.config, model.config.num_hidden_layers, model.config.moe_intermediate_size

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        keep32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        t = t.detach()
        return (t.float() if keep32 else t.to(dtype or t.dtype)).contiguous().clone().cpu()

    out: dict[str, torch.Tensor] = {}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    for name, t in tensors.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name in ("embed_tokens.weight", "norm.weight"):
            hf = f"model.{name}"
        elif name == "lm_head.weight":
            hf = name
        else:
            head, idx, rest = name.split(".", 2)
            i = int(idx) if head == "layers" else L + int(idx)
            hf = f"model.layers.{i}.{rest}"
        if hf.endswith("mlp.experts.w13"):
            base = hf[: -len("w13")]
            for e in range(cfg.n_routed_experts):
                out[f"{base}{e}.gate_proj.weight"] = cast(hf, t[e, :I])
                out[f"{base}{e}.up_proj.weight"] = cast(hf, t[e, I:])
        elif hf.endswith("mlp.experts.w2"):
            base = hf[: -len("w2")]
            for e in range(cfg.n_routed_experts):
                out[f"{base}{e}.down_proj.weight"] = cast(hf, t[e])
        else:
            out[hf] = cast(hf, t)
    for k, layer in enumerate(model.mtp):
        prefix = f"model.layers.{L + k}."
        embed = model.embed_tokens if layer.embed_tokens is None else layer.embed_tokens
        head = model.lm_head if layer.shared_head.head is None else layer.shared_head.head
        out[prefix + "embed_tokens.weight"] = cast("", embed.weight)
        out[prefix + "shared_head.head.weight"] = cast("", head.weight)
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use bytes or a string like '500MB' / '5GB'")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def write_pretrained(model: Transformer, directory: str | Path, max_shard_size: int | str = "5GB",
                     dtype: torch.dtype | None = None) -> None:
    """Write config.json and the safetensors file(s) (sharded above max_shard_size) into `directory`."""
    directory = Path(directory)
    limit = _parse_size(max_shard_size)
    state = hf_state_dict(model, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(dtype or model.embed_tokens.weight.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_pretrained(model: Transformer, path: str | Path, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write a checkpoint directory atomically.

    The files are written into a temporary sibling directory which then replaces `path`, so an
    interrupted or failed save (full disk) leaves any previous checkpoint at `path` intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_pretrained(model, tmp, max_shard_size, dtype)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, path: Path) -> None:
    """Move `new` to `path`; an existing `path` is kept until the new one is in place.

    Files of the old directory that the new one does not write (tokenizer, run records) carry over;
    old weight files do not.
    """
    if path.exists():
        for item in path.iterdir():
            stale_weights = item.name.startswith("model") and item.name.endswith((".safetensors", ".json"))
            if not stale_weights and not (new / item.name).exists():
                copy = shutil.copytree if item.is_dir() else shutil.copy2
                copy(item, new / item.name)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy tokenizer files (if any) from one checkpoint directory to another."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
