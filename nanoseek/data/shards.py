"""Token shards: documents tokenised once into flat binary files that are memory-mapped later.

The token stream is   doc_0 EOS doc_1 EOS ... doc_n EOS   cut into files of `shard_tokens`
tokens (the last one shorter), stored raw little-endian: uint16 when the vocabulary fits
(< 65536), else uint32. A folder holds

    shard_00000.bin, shard_00001.bin, ...
    manifest.json   {"format", "dtype", "vocab_size", "eos_id", "n_docs", "total_tokens",
                     "shards": [{"file", "tokens"}], "sha256" (of all token bytes in order)}

It is written into a temporary sibling folder and renamed into place, so a folder with a
manifest is always complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanoseek.data.tokenizer import Tokenizer

FORMAT = "nanoseek-shards-v1"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> str:
    """The smallest dtype name in DTYPES that holds every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_shards(
    docs: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    shard_tokens: int = 2**24,
    batch_docs: int = 1024,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Tokenise `docs` (batches of `batch_docs` through the tokenizer's parallel batch
    encoder), append EOS to each, write shards of `shard_tokens` tokens and the manifest into
    `out_dir`; return the manifest. An existing `out_dir` is replaced only with overwrite=True."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(
            f"{out_dir} already exists; pass overwrite=True to replace it or choose another out_dir"
        )
    if shard_tokens < 1 or batch_docs < 1:
        raise ValueError(f"shard_tokens={shard_tokens} and batch_docs={batch_docs} must be positive")
    dtype_name = token_dtype(tokenizer.vocab_size)
    dtype = DTYPES[dtype_name]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict] = []
    digest = hashlib.sha256()

    def flush(tokens: np.ndarray) -> None:
        name = f"shard_{len(shards):05d}.bin"
        tokens.tofile(tmp / name)
        digest.update(tokens.tobytes())
        shards.append({"file": name, "tokens": int(tokens.size)})

    try:
        bar = tqdm(desc=f"tokenising into {out_dir}", unit="doc", disable=not progress)
        pending: list[np.ndarray] = []  # token arrays not yet written, pending_n tokens in all
        pending_n = n_docs = 0
        docs = iter(docs)
        while batch := list(itertools.islice(docs, batch_docs)):
            for ids in tokenizer.encode_batch(batch):
                ids.append(tokenizer.eos_id)
                pending.append(np.asarray(ids, dtype=dtype))
                pending_n += len(ids)
            n_docs += len(batch)
            bar.update(len(batch))
            if pending_n >= shard_tokens:
                stream = np.concatenate(pending)
                full = stream.size // shard_tokens * shard_tokens
                for start in range(0, full, shard_tokens):
                    flush(stream[start : start + shard_tokens])
                pending, pending_n = [stream[full:]], stream.size - full
        bar.close()
        if pending_n:
            flush(np.concatenate(pending))
        if not shards:
            raise ValueError(f"no documents to write into {out_dir}; pass a non-empty iterable of texts")
        manifest = {
            "format": FORMAT,
            "dtype": dtype_name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "n_docs": n_docs,
            "total_tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
            "sha256": digest.hexdigest(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():  # overwrite: move the old folder aside first, then swap
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def open_shards(path: str | Path, check_hash: bool = False) -> tuple[list[np.memmap], dict]:
    """Memory-map every shard of a folder written by write_shards; return (shards, manifest).
    Each shard is a read-only 1-D array of token ids. check_hash=True re-reads all bytes and
    compares the manifest's sha256."""
    path = Path(path)
    rewrite = "write the shards again with nanoseek.data.shards.write_shards"
    if not (path / "manifest.json").is_file():
        raise ValueError(f"no manifest.json in {path}; {rewrite}")
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        dtype = DTYPES[manifest["dtype"]]
        files = [(s["file"], int(s["tokens"])) for s in manifest["shards"]]
        problem = None
        if manifest["format"] != FORMAT:
            problem = f"format {manifest['format']!r} is not {FORMAT!r}"
        elif sum(n for _, n in files) != manifest["total_tokens"]:
            problem = f"shard token counts do not add up to total_tokens={manifest['total_tokens']}"
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise ValueError(f"corrupt manifest {path / 'manifest.json'} ({problem}); {rewrite}")
    shards = []
    for name, tokens in files:
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size != tokens * dtype.itemsize:
            raise ValueError(
                f"shard {file} has {size} bytes but the manifest says {tokens} {manifest['dtype']} tokens "
                f"({tokens * dtype.itemsize} bytes); {rewrite}"
            )
        shards.append(np.memmap(file, dtype=dtype, mode="r"))
    if check_hash:
        digest = hashlib.sha256()
        for shard in shards:
            digest.update(shard.tobytes())
        if digest.hexdigest() != manifest["sha256"]:
            raise ValueError(f"the token bytes in {path} do not match the manifest's sha256; {rewrite}")
    return shards, manifest
