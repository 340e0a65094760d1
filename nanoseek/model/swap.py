"""Module swaps: the one way fast paths, FP8 and parallelism reach into the model from outside.

The model's modules are the reference maths. A fast path is a subclass (or a wrapper) that computes
the same thing faster under some conditions; it is put in place of the reference module, holding the
very same parameters and buffers:

    replace_modules(model, fn)      fn(name, module) -> a replacement or None; set on the parent in place
    shared_copy(model)              a new module tree whose parameters and buffers ARE the model's

`shared_copy` lets a caller (the inference engine) swap fast paths into its own copy without touching
the caller's modules: an optimizer step on the model changes the tensors the copy reads, so the next
forward of the copy follows it (also through CUDA graphs, which read the same storage).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def replace_modules(root: nn.Module, fn: Callable[[str, nn.Module], nn.Module | None]) -> int:
    """Replace every submodule m (name as in `named_modules`) for which fn(name, m) returns a module.

    Post-order: a module's children are offered to fn before the module itself, so a swapped block
    holds swapped children; a replacement's own children are not offered again (a wrapper is not
    wrapped twice). The root is never replaced. Returns the number of replacements."""
    count = 0

    def visit(parent: nn.Module, prefix: str) -> None:
        nonlocal count
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            visit(child, name + ".")
            new = fn(name, child)
            if new is not None:
                setattr(parent, child_name, new)  # also for ModuleList / ModuleDict entries ("0", ...)
                count += 1

    visit(root, "")
    return count


def adopt(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A module of class `cls` (a subclass of module's class) with module's state: the same parameter,
    buffer and child objects, its own registries (registering on one does not touch the other)."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} must subclass {type(module).__name__} to adopt its state")
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for registry in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        new.__dict__[registry] = copy.copy(module.__dict__[registry])
    return new


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer tensor with `model`.

    Modules, their attributes and registries are new objects; tensors registered as parameters or
    buffers are the same objects. Not carried over: a compiled module's compiled call, and tensors held
    as plain attributes (training statistics such as `MoE.balance_loss`, which may hold an autograd
    graph): the copy's attributes are None."""
    memo: dict[int, object] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        memo[id(tensor)] = tensor
    for module in model.modules():
        compiled = module.__dict__.get("_compiled_call_impl")
        if compiled is not None:
            memo[id(compiled)] = None
        for value in module.__dict__.values():
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = None
    return copy.deepcopy(model, memo)
