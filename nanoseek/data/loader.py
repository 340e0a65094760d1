"""Packed next-token batches from token shards, resumable to the exact batch.

The shards form one token stream t[0..N). Window w covers t[w*S : w*S + S + 1] (S = seq_len):
consecutive windows share one token, so every token but the first is a target exactly once
per epoch, and documents are packed across window edges (EOS marks their boundaries).

    inputs  = window[:-1]   (B, S) torch.long
    targets = window[1:]    (B, S) torch.long

Each epoch visits the windows in a fresh order, a permutation drawn from (seed, epoch). Step k
of an epoch takes the k-th block of B * world_size windows; rank r gets the r-th B of them, so
data-parallel ranks never share a window and together see what one rank would see with
world_size times the batch. The tail that does not fill a block is dropped for that epoch.

The position is (epoch, step); state_dict() saves it and load_state_dict() restores it, so a
resumed run gets exactly the batches the interrupted run would have got next.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.shards import open_shards


class PackedLoader:
    """Endless iterator of (input_ids, targets), each (batch_size, seq_len) torch.long.

    `len(loader)` is the number of steps per epoch; `epoch` and `step` give the position of the
    next batch.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.shards, self.manifest = open_shards(shard_dir)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        sizes = [len(s) for s in self.shards]
        self.offsets = np.cumsum([0] + sizes)  # shard i holds t[offsets[i] : offsets[i + 1]]
        total = int(self.offsets[-1])
        self.n_windows = (total - 1) // seq_len
        self.steps_per_epoch = self.n_windows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            need = batch_size * world_size * seq_len + 1
            raise ValueError(
                f"{shard_dir} holds {total} tokens, but one step needs {need} "
                f"(batch_size={batch_size} x world_size={world_size} x seq_len={seq_len} + 1); "
                "add data or lower batch_size/seq_len"
            )
        self.epoch, self.step = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def _window(self, w: int) -> np.ndarray:
        """Tokens t[w*S : w*S + S + 1], gathered across shard edges."""
        start, stop = w * self.seq_len, w * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        for i in range(first, len(self.shards)):
            lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if lo >= hi:
                break
            parts.append(self.shards[i][lo - self.offsets[i] : hi - self.offsets[i]])
        return np.concatenate(parts)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        first = (self.step * self.world_size + self.rank) * self.batch_size
        windows = self._order[first : first + self.batch_size]
        rows = [self._window(int(w)) for w in windows]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, S+1)
        self.step += 1
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict:
        """The position of the next batch, plus what must match for it to mean the same data."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "data_sha256": self.manifest["sha256"],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position. The seed and the batch layout must be unchanged (the
        same position would mean other data otherwise); changed data only warns."""
        for key in ("seed", "seq_len", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has {key}={getattr(self, key)}; "
                    f"resume with the same {key} or start the data from scratch"
                )
        if state["data_sha256"] != self.manifest["sha256"]:
            warnings.warn(
                "the token shards differ from the ones this loader state was saved with", stacklevel=2
            )
        if not 0 <= state["step"] <= self.steps_per_epoch:
            raise ValueError(
                f"loader state step={state['step']} is past the end of this data's epoch "
                f"({self.steps_per_epoch} steps); resume with the data the state was saved with"
            )
        self.epoch, self.step = state["epoch"], state["step"]
        self._order = self._permutation(self.epoch)
