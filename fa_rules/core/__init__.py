"""The engine: network view, rule interface and combinators, autodiff, feedback, gradient flow,
inverse maps, trainer, distributed training, checkpoints. Imports nothing from the rest of fa_rules."""

from fa_rules.core.autodiff import SavedTensorsProbe, grad, grad_and_value, vjp
from fa_rules.core.combinators import clamp, constrained, partition, weighted_sum
from fa_rules.core.data import Dataset, DatasetSpec
from fa_rules.core.errors import UserError
from fa_rules.core.hooks import hookimpl
from fa_rules.core.metrics import classification_loss
from fa_rules.core.network import Block, ModelSpec, Network, call_with
from fa_rules.core.rule import TASKS, Batch, Rule, RuleSpec, no_state_init

__all__ = [
    "TASKS", "Batch", "Block", "Dataset", "DatasetSpec", "ModelSpec", "Network", "Rule", "RuleSpec",
    "SavedTensorsProbe", "UserError", "call_with", "clamp", "classification_loss", "constrained", "grad",
    "grad_and_value", "hookimpl", "no_state_init", "partition", "vjp", "weighted_sum",
]
