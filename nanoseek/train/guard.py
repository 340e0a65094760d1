"""NaN/Inf guard of the training loop, kept on the device.

Each step, `optimizer_step(..., skip_nonfinite=True)` returns `finite` (a bool device tensor: loss and
grad norm were finite, so the update was applied; otherwise the step changed nothing). `update`
folds it into device counters without reading it; the host reads the counters only at log and
checkpoint steps (`check`), where the loop synchronises anyway. So a skipped step costs no sync, a
warning names it at the next log step, and a streak of `limit` skipped steps in a row stops the run
at the next log step.
"""

from __future__ import annotations

import torch


class NonFiniteGuard:
    """Device counters of skipped (NaN/Inf) steps: the current streak, the longest streak since the
    last check, the total, and the step number of the latest skipped step."""

    def __init__(self, device: torch.device, first_step: int, limit: int):
        z = torch.zeros((), dtype=torch.long, device=device)
        self.step = z + first_step  # step number of the last update (1-based, like the loop's)
        self.streak, self.worst, self.total, self.last_bad = z.clone(), z.clone(), z.clone(), z.clone()
        self.limit, self.reported = limit, 0

    def update(self, finite: torch.Tensor) -> None:
        """Fold one step's flag in (device ops only, no sync)."""
        bad = (~finite).long()
        self.step += 1
        self.streak.add_(1).mul_(bad)  # (streak + 1) on a skipped step, else 0
        torch.maximum(self.worst, self.streak, out=self.worst)
        self.total += bad
        torch.where(finite, self.last_bad, self.step, out=self.last_bad)

    def check(self) -> tuple[str | None, bool]:
        """Read the counters (a host sync): a warning about newly skipped steps (or None), and whether
        `limit` steps in a row were skipped. Resets the longest-streak counter."""
        streak, worst, total, last = (int(v) for v in torch.stack([self.streak, self.worst, self.total,
                                                                   self.last_bad]).tolist())
        self.worst.copy_(self.streak)
        note = None
        if total > self.reported:
            note = (f"warning: skipped {total - self.reported} step(s) with a NaN/Inf loss or gradient norm "
                    f"(no update; latest at step {last}; {total} in this run)")
            self.reported = total
        return note, max(streak, worst) >= self.limit

    def in_streak(self) -> bool:
        """Whether the latest step was skipped (a host sync)."""
        return bool(self.streak > 0)

    def last_bad_step(self) -> int:
        return int(self.last_bad)
