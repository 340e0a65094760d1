"""CUDA graphs of the engine's device work: one keyed capture mechanism for decode steps, speculative
steps and prefills.

A decode step at batch 1 is a chain of about 120 small kernels: launched one by one from Python the
host, not the GPU, sets the pace. Captured once as a CUDA graph, the whole chain is one replay.
A graph replays fixed shapes and fixed memory, so the work is keyed by what changes its kernels
(kind, rows, padded lengths, sampling mode, ...), and inputs that change between calls (positions,
uniforms, prompt ids) are copied into the key's static tensors before each replay:

    graphs = CudaGraphs()
    out = graphs(key, fn, inputs, state)   # first use of key: warm up, capture; then copy inputs, replay

Tensors the work updates in place (pending tokens, drafts) are named in `state`: they are restored
after the warm-up runs, so that capturing leaves them as they were. Parameters are read from their
own storage, so an optimizer step on the model is seen by the next replay.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch


def warm_up_for_capture(run: Callable[[], object]) -> None:
    """Run `run` twice on a side stream before a CUDA graph captures it. The first run may compile
    (compiling syncs); the second must not sync with the host, and runs with sync debugging set to
    raise, so a step that syncs (e.g. `nonzero` in the looped expert path) fails here. Capture would
    fail on it too, but a capture that fails part-way leaves PyTorch's CUDA generator in capture
    mode, and every later CUDA random op (the compiler's own included) raises."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)


class CudaGraphs:
    """Graphs keyed by tuples whose first entry names the kind of work ("decode step", "prefill", ...).

    All graphs share one memory pool. A capture that fails (the work syncs with the host, or the
    compiler fails inside a capture) warns once and runs that kind eagerly from then on."""

    def __init__(self):
        # key -> (graph, static inputs, captured outputs)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor | None], object]] = {}
        self.pool = None
        self.eager: set[str] = set()  # kinds whose capture failed

    def __call__(self, key: tuple, fn: Callable[..., object], inputs: Sequence[torch.Tensor | None],
                 state: Sequence[torch.Tensor] = ()) -> object:
        """fn(*inputs) through the graph of `key`: inputs are device tensors (or None), copied into the
        graph's static ones; the returned tensors are the graph's and hold until its next replay."""
        if key[0] in self.eager:
            return fn(*inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, fn, inputs, state)
            if entry is None:
                return fn(*inputs)
        else:
            for static, x in zip(entry[1], inputs):
                if static is not None:
                    static.copy_(x, non_blocking=True)
        graph, _, out = entry
        graph.replay()
        return out

    def _capture(self, key: tuple, fn: Callable[..., object], inputs: Sequence[torch.Tensor | None],
                 state: Sequence[torch.Tensor]):
        static = [None if x is None else x.clone() for x in inputs]
        saved = [t.clone() for t in state]

        def restore() -> None:
            for t, value in zip(state, saved):
                t.copy_(value)

        try:
            warm_up_for_capture(lambda: (restore(), fn(*static)))
            restore()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn(*static)
            if self.pool is None:
                self.pool = graph.pool()
        except Exception as e:  # CUDA errors, or the compiler's own when a capture triggers a compile
            warnings.warn(f"CUDA graph capture of the {key[0]} failed ({e}); running it eagerly", stacklevel=3)
            self.eager.add(key[0])
            restore()
            return None
        restore()
        self.graphs[key] = (graph, static, out)
        return self.graphs[key]
