"""The hooks a plugin may implement. Each receives a `register` callback taking one spec."""

from fa_rules.core.hooks import hookspec


@hookspec
def register_rules(register):
    """Register credit-assignment rules: call `register(RuleSpec(...))` for each."""


@hookspec
def register_datasets(register):
    """Register datasets: call `register(DatasetSpec(...))` for each."""


@hookspec
def register_models(register):
    """Register model families: call `register(ModelSpec(...))` for each."""
