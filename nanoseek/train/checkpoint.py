"""Training checkpoints: HF-format weights plus everything needed to resume exactly.

    out_dir/checkpoints/step-000500/
        config.json, model.safetensors      the model (loads with from_pretrained and in transformers)
        tokenizer.json, tokenizer_config.json
        trainer_state.pt                    optimizer, step, loader position, RNG (tensors + plain data)
        run.json                            config, git commit, versions, hardware

A checkpoint is written into a temporary directory and renamed into place, so a crash or a full
disk never leaves a half-written checkpoint, and older ones stay until the new one exists.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from nanoseek.hf import copy_tokenizer_files, load_pretrained, write_pretrained
from nanoseek.model.transformer import Transformer

STATE_FILE = "trainer_state.pt"


def run_record(config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """What produced a checkpoint: config, code version, library versions, hardware."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import nanoseek

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "nanoseek": nanoseek.__version__}
    hardware = {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name(device)
        versions["cuda"] = torch.version.cuda
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": commit, "versions": versions,
            "hardware": hardware, "config": config}


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file())


def save_checkpoint(out_dir: str | Path, step: int, model: Transformer, state: dict[str, Any],
                    tokenizer_dir: str | Path | None, record: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` atomically and prune all but the last `keep_last`."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.tmp-", dir=root))
    try:
        write_pretrained(model, tmp, dtype=torch.float32)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: Transformer) -> dict[str, Any]:
    """Load weights into `model` (shapes must match) and return the trainer state."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise SystemExit(f"nanoseek train: {path} is not a training checkpoint (no {STATE_FILE}); "
                         "pass a step-* directory or --resume auto")
    saved = load_pretrained(path, dtype=torch.float32, device=model.embed_tokens.weight.device)
    ours, theirs = model.config.to_hf_dict(), saved.config.to_hf_dict()
    diffs = [f"{k}: checkpoint {theirs.get(k)!r} vs run {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
             if ours.get(k) != theirs.get(k)]
    if diffs:
        raise SystemExit(f"nanoseek train: checkpoint {path} has another model shape ({'; '.join(diffs)}); "
                         "resume with the same --model.* options, or use a new --train.out_dir")
    model.load_state_dict(saved.state_dict())
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
