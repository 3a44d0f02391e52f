"""`grad`, `grad_and_value` and `vjp` for rules, plus the saved-tensor memory probe.

Rules differentiate with these instead of calling `torch.func` directly; they behave as
`torch.func.grad` / `grad_and_value` / `vjp`, and each call picks how to evaluate:

- with plain `torch.autograd` whenever no `torch.func` transform is running: the same graph and
  the same values, without functorch's per-operation wrapping, which is most of the engine's
  overhead on small steps. Nested calls (a rule that differentiates through an inner gradient,
  as feature alignment's flow does) build the inner graph with `create_graph`. This is also the only
  way to run under the memory probe: `torch.func` refuses `saved_tensors_hooks`;
- with `torch.func` inside a `torch.func` transform (`vmap`, `jvp`, a `torch.func.grad` of the rule's
  own, or `torch.compile` when `functional_transforms()` asks for it), where they compose with it.

A rule author sees one function either way; `tests/test_autodiff.py` checks that both paths agree,
second order included.
"""

from __future__ import annotations

import contextvars
import functools
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.func
from torch.utils._pytree import tree_flatten, tree_unflatten

_probing = contextvars.ContextVar("fa_rules_probing", default=False)
_depth = contextvars.ContextVar("fa_rules_autograd_depth", default=0)
_force_func = contextvars.ContextVar("fa_rules_force_torch_func", default=False)
# True while the function of a plain-autograd `grad`/`vjp` runs whose backward pass nothing will
# differentiate (no create_graph): there a saved tensor may stand in for another (`first_order`)
_first_order = contextvars.ContextVar("fa_rules_first_order", default=False)


@functools.cache
def load_forward_ad() -> None:
    """torch's forward-mode AD (`torch.func.jvp`, dual tensors) imports its jvp decompositions on first
    use, and that import calls the deprecated `torch.jit.script`: a FutureWarning on the first step of
    any rule using forward mode that is torch's, not the rule author's. The engine makes that first
    use once per process (the trainer and the conformance suite call this before any step) with
    that one warning silenced; about 0.3 s, and nothing else is filtered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        torch.func.jvp(torch.sin, (torch.zeros(()),), (torch.ones(()),))


def plain_autograd() -> bool:
    """True where plain autograd gives what torch.func would: no torch.func transform is running."""
    if _probing.get():
        return True
    return not _force_func.get() and torch._C._functorch.peek_interpreter_stack() is None


def closed_form_allowed() -> bool:
    """True where a rule may take its first derivatives in closed form, without a graph: plain
    autograd, outside the function of any `grad` or `vjp` (which would differentiate through the
    result), and outside the memory probe, which measures every rule by what autograd saves."""
    return not (_probing.get() or _first_order.get() or _depth.get()) and plain_autograd()


def first_order() -> bool:
    """True inside the function of a `grad`, `grad_and_value` or `vjp` evaluated by plain autograd
    whose backward pass is not itself differentiated, outside the memory probe: where a caller may
    set its own `saved_tensors_hooks` and change what the backward pass reads (its first
    derivatives), as `fa_rules.core.feedback` does to route an input gradient through a feedback
    tensor. Anywhere else (torch.func, nested differentiation, the probe) False."""
    return _first_order.get() and not _probing.get() and plain_autograd()


class functional_transforms:
    """Within this context the functions here always use `torch.func` (outside the memory probe):
    for tracing a step with `torch.compile`, which captures `torch.func` transforms whole."""

    def __enter__(self):
        self._token = _force_func.set(True)
        return self

    def __exit__(self, *exc):
        _force_func.reset(self._token)
        return False


class _GroupsSpec(tuple):
    """How `_flatten` took a dict of tensors, or of dicts of tensors, apart: (key, sub-keys or None)."""


def _flatten(tree) -> tuple[list, Any]:
    """`tree_flatten`, the same leaves in the same order, with a direct path for the engine's
    parameter groups (a dict of tensors or of dicts of tensors): pytree's generic walk there and
    back was about a tenth of a tiny MLP's step (cProfile by CPU time)."""
    if type(tree) is not dict:
        return tree_flatten(tree)
    leaves, shape = [], []
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            leaves.append(value)
            shape.append((key, None))
        elif type(value) is dict and all(isinstance(t, torch.Tensor) for t in value.values()):
            leaves.extend(value.values())
            shape.append((key, tuple(value)))
        else:
            return tree_flatten(tree)
    return leaves, _GroupsSpec(shape)


def _unflatten(leaves: list, spec) -> Any:
    if not isinstance(spec, _GroupsSpec):
        return tree_unflatten(leaves, spec)
    out, i = {}, 0
    for key, sub in spec:
        if sub is None:
            out[key], i = leaves[i], i + 1
        else:
            out[key], i = dict(zip(sub, leaves[i : i + len(sub)])), i + len(sub)
    return out


def _as_input(t: torch.Tensor) -> torch.Tensor:
    # a tensor already on an outer graph stays attached (nested differentiation); others become leaves
    return t if t.requires_grad else t.detach().requires_grad_(True)


def _autograd_grad_and_value(f, argnums, has_aux) -> Callable:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def wrapper(*args, **kwargs):
        args = list(args)
        flats, specs = {}, {}
        for n in nums:
            leaves, spec = _flatten(args[n])
            leaves = [_as_input(t) for t in leaves]
            flats[n], specs[n] = leaves, spec
            args[n] = _unflatten(leaves, spec)
        outer = _depth.get()  # > 0: an enclosing grad differentiates through this one's backward
        token = _depth.set(outer + 1)
        first = _first_order.set(outer == 0)
        try:
            with torch.enable_grad():
                result = f(*args, **kwargs)
        finally:
            _first_order.reset(first)
            _depth.reset(token)
        value, aux = result if has_aux else (result, None)
        inputs = [t for n in nums for t in flats[n]]
        nested = _depth.get() > 0  # an enclosing grad differentiates through this one
        grads = torch.autograd.grad(value, inputs, create_graph=nested, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
        out, start = [], 0
        for n in nums:
            k = len(flats[n])
            out.append(_unflatten(grads[start : start + k], specs[n]))
            start += k
        g = out[0] if isinstance(argnums, int) else tuple(out)
        if not nested:
            value = value.detach()
        return (g, (value, aux)) if has_aux else (g, value)

    return wrapper


def grad_and_value(f: Callable, argnums=0, has_aux: bool = False) -> Callable:
    """Like `torch.func.grad_and_value`."""
    if plain_autograd():
        return _autograd_grad_and_value(f, argnums, has_aux)
    return torch.func.grad_and_value(f, argnums=argnums, has_aux=has_aux)


def grad(f: Callable, argnums=0, has_aux: bool = False) -> Callable:
    """Like `torch.func.grad`."""
    if plain_autograd():
        gv = _autograd_grad_and_value(f, argnums, has_aux)

        def only_grad(*args, **kwargs):
            g, v = gv(*args, **kwargs)
            return (g, v[1]) if has_aux else g

        return only_grad
    return torch.func.grad(f, argnums=argnums, has_aux=has_aux)


def vjp(f: Callable, *primals, has_aux: bool = False):
    """Like `torch.func.vjp`: returns `(output, vjp_fn)` (and aux)."""
    if not plain_autograd():
        return torch.func.vjp(f, *primals, has_aux=has_aux)
    leaves, spec = tree_flatten(list(primals))
    leaves = [_as_input(t) for t in leaves]
    inputs = tree_unflatten(leaves, spec)
    nested = _depth.get() > 0
    first = _first_order.set(not nested)
    try:
        with torch.enable_grad():
            result = f(*inputs)
    finally:
        _first_order.reset(first)
    out, aux = result if has_aux else (result, None)

    def vjp_fn(cotangent):
        out_leaves, _ = tree_flatten(out)
        cot_leaves, _ = tree_flatten(cotangent)
        # outputs that depend on no input (a parameter-free block on a cut input) and inputs that
        # are none (no parameters) contribute zeros, as torch.func.vjp gives them
        pairs = [(o, c) for o, c in zip(out_leaves, cot_leaves) if o.requires_grad]
        grads = [None] * len(leaves)
        if pairs and leaves:
            grads = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], retain_graph=True,
                                        create_graph=nested, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        return tuple(tree_unflatten(grads, spec))

    shown = out
    if not nested:
        out_leaves, out_spec = tree_flatten(out)
        shown = tree_unflatten([t.detach() for t in out_leaves], out_spec)
    return (shown, vjp_fn, aux) if has_aux else (shown, vjp_fn)


class _Saved:
    """Handle for one saved tensor; its death (graph freed) releases the bytes it accounted for."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorsProbe:
    """Context manager measuring the peak bytes of tensors saved for backward at once.

    Storages are counted once however many graph nodes save them; parameters count too, as the
    graph holds them. Inside the probe the functions above run on `torch.autograd`.
    """

    def __init__(self):
        self.current = 0
        self.peak = 0
        self._refs: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        key = storage.data_ptr() if storage.nbytes() else id(storage)
        if self._refs.get(key, 0) == 0:
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self._refs[key] = self._refs.get(key, 0) + 1
        # detached: a node that saves its own output would otherwise hold itself through the
        # handle's tensor (a cycle through C++ that Python's gc cannot see), and never be freed;
        # autograd restores the saved tensor's graph metadata on unpack
        handle = _Saved(t.detach())
        weakref.finalize(handle, self._release, key, storage.nbytes())
        return handle

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= nbytes

    @staticmethod
    def _unpack(handle: _Saved) -> torch.Tensor:
        return handle.tensor

    def __enter__(self):
        self._token = _probing.set(True)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        _probing.reset(self._token)
        return False
