"""Training checkpoints: HF-format weights plus everything needed to resume exactly.

    out_dir/checkpoints/step-000500/
        config.json, model.safetensors      the model (loads with from_pretrained and in transformers)
        tokenizer.json, tokenizer_config.json
        trainer_state.pt                    optimizer, step, loader position, RNG, schedule (tensors + plain data)
        run.json                            config, git commit, versions, hardware
        manifest.json                       every other file's size and sha256, written last

Writing: the files go into `.step-000500.tmp-XXXX`, each is fsynced, the manifest is written and
fsynced last, the directory is fsynced and then renamed into place (and its parent fsynced). A crash
or a full disk therefore never leaves a half-written `step-*` directory, and older checkpoints are
pruned only after the new one is in place. Leftover `.tmp-` directories of killed runs are removed by
`clean_partial`.

Reading: `verify_checkpoint` checks that the manifest lists every required file and that each file
has the recorded size and checksum; any problem is a `CheckpointError` naming the file and what is
wrong. Checkpoints written before manifests existed load with a notice (their weights are checked
for NaN/Inf instead).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from nanoseek.hf import CheckpointError, copy_tokenizer_files, load_pretrained, write_pretrained
from nanoseek.model.transformer import Transformer

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
REQUIRED = ("config.json", STATE_FILE, "run.json")  # + the weights (model.safetensors or an index)
SHARDED_REQUIRED = (STATE_FILE, "run.json")  # + dcp/ (torch.distributed.checkpoint shards: parallel runs)


def run_record(config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """What produced a checkpoint: config, code version, library versions, hardware."""
    try:  # NANOSEEK_REVISION names the commit of a copied tree whose .git is not the source's
        commit = os.environ.get("NANOSEEK_REVISION") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
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
    """The `step-*` directories of a run, oldest first (intact or not: `verify_checkpoint` decides)."""
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir())


_HELD_LOCKS: dict[Path, Any] = {}  # run directory -> its open lock file, kept for the life of the process


def lock_run_dir(out_dir: str | Path, command: str) -> None:
    """Claim `out_dir` for this process: a second run started on the same directory would prune, overwrite
    and clean up the first one's checkpoints. An advisory lock (`flock`) on `out_dir/.lock` is held until
    the process exits (the OS drops it even after a crash); a second claimant exits with an error naming
    the holder. A process may claim a directory it holds again (a resume in the same Python session).
    Not available on Windows (no `fcntl`): there this is a no-op."""
    try:
        import fcntl
    except ImportError:
        return
    path = (Path(out_dir) / ".lock").resolve()
    if path in _HELD_LOCKS:
        return
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise SystemExit(f"nanoseek {command}: {out_dir} is in use by {holder}; two runs in one directory would "
                         "overwrite each other's checkpoints. Wait for it to finish, stop it, or choose another "
                         "--train.out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {platform.node()} (nanoseek {command})\n")
    handle.flush()
    _HELD_LOCKS[path] = handle


def clean_partial(out_dir: str | Path) -> list[Path]:
    """Remove `.step-*.tmp-*` / `.step-*.old-*` directories that killed runs left behind; return them."""
    root = Path(out_dir) / "checkpoints"
    leftovers = sorted(p for pattern in (".step-*.tmp-*", ".step-*.old-*") for p in root.glob(pattern))
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


def weights_finite(model: torch.nn.Module) -> bool:
    """True when every parameter and buffer is free of NaN/Inf (one host sync)."""
    tensors = [_local(t) for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2, expert meshes), else the tensor: checks stay local."""
    return t.to_local() if hasattr(t, "to_local") else t


# ---------------------------------------------------------------------------- write
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, files in parallel threads (hashlib releases the GIL on large reads)."""
    with ThreadPoolExecutor(max_workers=min(4, len(paths) or 1)) as pool:
        return list(pool.map(_sha256, paths))


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str | Path, step: int, model: Transformer, state: dict[str, Any],
                    tokenizer_dir: str | Path | None, record: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` atomically (fsynced, with a checksum manifest) and prune all but the
    last `keep_last`. Raises OSError / RuntimeError / SafetensorError when the disk fails (the
    previous checkpoints are untouched then)."""
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
        publish_checkpoint(tmp, final, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(out_dir, final, keep_last)
    return final


def publish_checkpoint(tmp: Path, final: Path, step: int, fmt: str = "nanoseek-checkpoint-1") -> None:
    """Make a fully written temporary checkpoint directory the checkpoint `final`: fsync every file,
    write the checksum manifest (relative paths, subdirectories included), fsync, then rename into
    place (a checkpoint of the same step is swapped out, then deleted)."""
    paths = sorted(f for f in tmp.rglob("*") if f.is_file())
    for f in paths:
        _fsync(f)
    files = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": digest}
             for f, digest in zip(paths, _sha256_all(paths))}
    manifest = {"format": fmt, "step": step, "finite": True, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp / MANIFEST)
    for d in sorted({f.parent for f in paths} | {tmp}, key=lambda d: -len(d.parts)):
        _fsync(d)
    old = None
    if final.exists():  # the same step again (a resumed run's last step): swap, then delete
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(out_dir: str | Path, final: Path, keep_last: int) -> None:
    """Keep `final` and the keep_last - 1 newest checkpoints before it (pruning runs only after the new
    one is in place, so a failed write never costs an old checkpoint)."""
    older = [p for p in list_checkpoints(out_dir) if p.name < final.name]
    for p in older[:max(0, len(older) - (keep_last - 1))] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------- read
def verify_checkpoint(path: str | Path) -> bool:
    """Check a checkpoint directory before loading it; raise CheckpointError naming the bad file.

    Returns True when a manifest vouched for every file, False for an older checkpoint without one
    (its required files exist; the caller checks its weights for NaN/Inf after loading).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is not a directory; pass a step-* checkpoint directory or a run's out_dir")
    manifest_path = path / MANIFEST
    required = SHARDED_REQUIRED if (path / "dcp").is_dir() else REQUIRED
    if not manifest_path.is_file():
        missing = [n for n in required if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path / missing[0]}: missing (and no {MANIFEST}: an incomplete or foreign "
                                  "checkpoint directory)")
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError):
        raise CheckpointError(f"{manifest_path}: not a valid manifest (damaged)") from None
    for name in required:
        if name not in files:
            raise CheckpointError(f"{manifest_path}: does not list {name}")
    for name, meta in files.items():
        f = path / name
        if not isinstance(meta, dict) or not f.is_file():
            raise CheckpointError(f"{f}: missing (the manifest lists it)")
        size = f.stat().st_size
        if size != meta.get("bytes"):
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {meta.get('bytes')} (truncated or changed)")
    names = list(files)
    for name, digest in zip(names, _sha256_all([path / n for n in names])):
        if digest != files[name].get("sha256"):
            raise CheckpointError(f"{path / name}: checksum differs from the manifest (the file is damaged)")
    return True


def read_run_record(path: str | Path) -> dict[str, Any]:
    """A checkpoint's run.json (config, versions, hardware) as a dict."""
    f = Path(path) / "run.json"
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{f}: not a JSON object")
    return record


def load_checkpoint(path: str | Path, model: Transformer) -> dict[str, Any]:
    """Verify, then load the weights into `model` (shapes must match) and return the trainer state.

    Every problem is a CheckpointError whose message names the file (SystemExit for a model of
    another shape, a user mistake).
    """
    path = Path(path)
    vouched = verify_checkpoint(path)
    try:
        saved = load_pretrained(path, dtype=torch.float32, device=model.embed_tokens.weight.device)
    except CheckpointError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path / 'model.safetensors'}: cannot be read ({type(e).__name__}: {e})") from None
    ours, theirs = model.config.to_hf_dict(), saved.config.to_hf_dict()
    diffs = [f"{k}: checkpoint {theirs.get(k)!r} vs run {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
             if ours.get(k) != theirs.get(k)]
    if diffs:
        raise SystemExit(f"nanoseek train: checkpoint {path} has another model shape ({'; '.join(diffs)}); "
                         "resume with the same --model.* options, or use a new --train.out_dir")
    if not vouched and not weights_finite(saved):
        raise CheckpointError(f"{path / 'model.safetensors'}: holds NaN or Inf weights (written by a diverged run)")
    model.load_state_dict(saved.state_dict())
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path / STATE_FILE}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path / STATE_FILE}: holds no trainer state (no 'step')")
    return state
