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
    """Register model families: call `register(ModelSpec(...))` for each, or `register(factory)` with a
    plain factory `factory(in_shape, out_shape, **options)` returning an `nn.Sequential` of blocks
    (or a list of blocks, or a module with a `blocks` Sequential); see `ModelSpec.from_factory`."""
