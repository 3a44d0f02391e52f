"""A rule's step under `torch.compile` (`--compile`), with eager as the fallback.

The step is traced inside `autodiff.functional_transforms()`, so the engine's `grad`/`vjp` run as
`torch.func` transforms, which Dynamo captures whole (plain autograd would break the graph). The
first call compiles and also runs the eager step on the same inputs: when compiling raises, or
the compiled updates differ from eager's beyond float tolerance (a tracing that silently drops
part of a rule is worse than no speed-up), one warning line is printed and the rule runs eager
from then on.
"""

from __future__ import annotations

import sys
import time

import torch

from fa_rules.core.autodiff import functional_transforms
from fa_rules.core.errors import error_line
from fa_rules.core.rule import Batch, Groups, StepFn

# compiled against eager updates: float reassociation in fused kernels, far below any rule error
RTOL, ATOL = 1e-4, 1e-6


def updates_mismatch(compiled: Groups, eager: Groups) -> str | None:
    """The first update (group/key) where compiled and eager differ beyond tolerance, else None."""
    for group, tensors in eager.items():
        for key, e in tensors.items():
            c = compiled.get(group, {}).get(key)
            if c is None or c.shape != e.shape or not torch.allclose(c, e, rtol=RTOL, atol=ATOL):
                return f"compiled updates differ from eager at {group}/{key}"
    return None


class CompiledStep:
    """Callable like `rule.step`; see the module docstring. `compile_time_s` is the first call's
    time (compiling and the eager check), `compiled` whether compiled steps are in use."""

    def __init__(self, rule_name: str, step: StepFn):
        self.rule_name = rule_name
        self.eager_step = step
        self.compiled_step = torch.compile(step)
        self.compiled: bool | None = None  # None until the first call decides
        self.compile_time_s: float | None = None

    def __call__(self, network, params: Groups, state, batch: Batch):
        if self.compiled:
            with functional_transforms():
                return self.compiled_step(network, params, state, batch)
        if self.compiled is False:
            return self.eager_step(network, params, state, batch)
        return self._first_call(network, params, state, batch)

    def _first_call(self, network, params, state, batch):
        start = time.perf_counter()
        eager = None
        try:
            with functional_transforms():
                out = self.compiled_step(network, params, state, batch)
            eager = self.eager_step(network, params, state, batch)
            reason = updates_mismatch(out[0], eager[0])
        except Exception as e:  # whatever the compiler raises, the rule still trains eager
            reason = error_line(e)
        self.compile_time_s = time.perf_counter() - start
        self.compiled = reason is None
        if reason is not None:
            print(f"warning: rule {self.rule_name} does not compile ({reason}); running eager", file=sys.stderr)
            return eager if eager is not None else self.eager_step(network, params, state, batch)
        print(f"compiled rule {self.rule_name}'s step in {self.compile_time_s:.1f} s", file=sys.stderr)
        return out
