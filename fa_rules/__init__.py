"""fa-rules: composable credit-assignment rules on one torch.func engine.

The public face. Everything here is imported on first use, so that `import fa_rules.core` (the
engine) loads nothing else:

    from fa_rules import Rule, RuleSpec, Network, train, load_run

Layout: `core` (the engine), `rules` (one module per rule family), `plugins` (hook specs, plugin
manager, built-in datasets and models), `models` (the model zoo), `measures` (FID, linear probe),
`runs` (configuration -> trainer, run directory -> trained model), `benchmark` (suites, reports),
`cli` (the `fa-rules` command). Imports point one way: cli -> benchmark -> runs -> measures/plugins
-> rules -> models -> core.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # the rule interface
    "Rule": "fa_rules.core.rule", "RuleSpec": "fa_rules.core.rule", "Batch": "fa_rules.core.rule",
    "TASKS": "fa_rules.core.rule", "no_state_init": "fa_rules.core.rule",
    "hookimpl": "fa_rules.core.hooks", "UserError": "fa_rules.core.errors",
    # the network view, data and model registrations
    "Network": "fa_rules.core.network", "Block": "fa_rules.core.network", "ModelSpec": "fa_rules.core.network",
    "Dataset": "fa_rules.core.data", "DatasetSpec": "fa_rules.core.data",
    # combinators and autodiff
    "partition": "fa_rules.core.combinators", "weighted_sum": "fa_rules.core.combinators",
    "constrained": "fa_rules.core.combinators", "clamp": "fa_rules.core.combinators",
    "grad": "fa_rules.core.autodiff", "grad_and_value": "fa_rules.core.autodiff", "vjp": "fa_rules.core.autodiff",
    "classification_loss": "fa_rules.core.metrics",
    # training and runs
    "TrainConfig": "fa_rules.core.config", "Trainer": "fa_rules.core.trainer",
    "train": "fa_rules.runs", "new_trainer": "fa_rules.runs", "resume_trainer": "fa_rules.runs",
    "load_run": "fa_rules.runs",
    # plugins and conformance
    "get_registry": "fa_rules.plugins.manager", "assert_conformant": "fa_rules.testing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fa_rules' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
