"""The plugin manager: built-in modules and third-party entry points, registered the same way.

Third-party packages declare, in their pyproject.toml:

    [project.entry-points.fa_rules]
    my_rules = "my_package.my_module"

Set FA_RULES_NO_AUTOLOAD=1 to skip entry points (only the built-ins load).

Names are first come, first served, built-ins first: a plugin that registers a rule, dataset or
model under a name (or alias) already taken keeps none of that registration. The conflict is a
warning naming both plugins and distributions (`Registry.conflicts`, printed by every command);
the name keeps meaning the first registration, and everything else loads as usual.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from fa_rules.core.data import DatasetSpec
from fa_rules.core.errors import UserError, unknown_name_error
from fa_rules.core.hooks import PROJECT
from fa_rules.core.network import ModelSpec
from fa_rules.core.rule import RuleSpec
from fa_rules.plugins import hookspecs

ENTRY_POINT_GROUP = "fa_rules"
NO_AUTOLOAD_ENV = "FA_RULES_NO_AUTOLOAD"
TORCHVISION_PREFIX = "torchvision:"  # `torchvision:resnet18`: torchvision's classification model by name
PYTHON_PREFIX = "python:"  # a module or factory handed to `fa_rules.train(model=...)`
BUILTIN_DISTRIBUTION = "fa-rules"

# Built-in plugin modules, registered exactly as entry points are.
BUILTIN_PLUGINS = (
    "fa_rules.rules.backprop",
    "fa_rules.rules.feedback_alignment",
    "fa_rules.rules.learned_feedback",
    "fa_rules.rules.feature_alignment",
    "fa_rules.rules.local_feature_alignment",
    "fa_rules.rules.autoencoder",
    "fa_rules.rules.target_propagation",
    "fa_rules.rules.direct_target_propagation",
    "fa_rules.rules.deep_feedback_control",
    "fa_rules.rules.variational_feature_alignment",
    "fa_rules.rules.generative_baselines",
    "fa_rules.plugins.datasets",
    "fa_rules.plugins.models",
)

_KINDS = {"rules": RuleSpec, "datasets": DatasetSpec, "models": ModelSpec}


@dataclass(frozen=True)
class Source:
    plugin: str
    distribution: str


@dataclass
class Registry:
    """Everything the plugins registered, with where each name came from."""

    rules: dict[str, RuleSpec] = field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    sources: dict[tuple[str, str], Source] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # registrations refused: their name was taken
    # models known by a name no plugin registers: torchvision's by name, modules handed to the Python API
    named_models: dict[str, ModelSpec] = field(default_factory=dict)

    def _add(self, kind: str, spec: Any, source: Source) -> None:
        if kind == "models" and callable(spec) and not isinstance(spec, ModelSpec):
            spec = ModelSpec.from_factory(spec)  # a plain factory returning an nn.Module
        if not isinstance(spec, _KINDS[kind]):
            raise TypeError(f"register_{kind} expects {_KINDS[kind].__name__}, got {type(spec).__name__}")
        table = getattr(self, kind)
        names = [spec.name, *getattr(spec, "aliases", ())]
        for name in names:
            if (kind, name) in self.sources:  # the first registration keeps the name; this one is dropped
                other = self.sources[(kind, name)]
                self.conflicts.append(
                    f"{kind[:-1]} name '{name}' of plugin '{source.plugin}' ({source.distribution}) is already "
                    f"registered by plugin '{other.plugin}' ({other.distribution}); '{name}' keeps meaning the "
                    f"latter, and {source.distribution}'s {kind[:-1]} '{spec.name}' is not available"
                )
                return
        table[spec.name] = spec
        for name in names:
            self.sources[(kind, name)] = source
        for alias in getattr(spec, "aliases", ()):
            self.aliases[alias] = spec.name

    def source(self, kind: str, name: str) -> Source:
        return self.sources[(kind, name)]

    def rule(self, name: str) -> RuleSpec:
        name = self.aliases.get(name, name)
        if name not in self.rules:
            raise unknown_name_error("rule", name, [*self.rules, *self.aliases])
        return self.rules[name]

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise unknown_name_error("dataset", name, list(self.datasets))
        return self.datasets[name]

    def model(self, name: str) -> ModelSpec:
        if name in self.models:
            return self.models[name]
        if name not in self.named_models:
            if name.startswith(TORCHVISION_PREFIX):
                from fa_rules.plugins.torchvision_models import torchvision_model_spec

                self.named_models[name] = torchvision_model_spec(name[len(TORCHVISION_PREFIX):])
            elif name.startswith(PYTHON_PREFIX):
                raise UserError(f"model '{name}' was a module handed to fa_rules.train; hand it again: "
                                "resume_trainer(run_dir, model=...) or load_run(run_dir, model=...)")
            else:
                raise unknown_name_error("model", name, [*self.models, f"{TORCHVISION_PREFIX}NAME"])
        return self.named_models[name]

    def add_python_model(self, model) -> str:
        """Make a module or a factory handed to the Python API a model of this process; returns its
        name, `python:` and the class or function name (what config.json records)."""
        spec = ModelSpec.from_module(model, PYTHON_PREFIX)
        self.named_models[spec.name] = spec
        return spec.name


def _distribution_of(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "unknown"


def build_registry(autoload: bool | None = None) -> Registry:
    """Load built-ins and (unless disabled) entry-point plugins, then collect their registrations."""
    if autoload is None:
        autoload = os.environ.get(NO_AUTOLOAD_ENV, "").strip().lower() in ("", "0", "false", "no")
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    sources: dict[str, Source] = {}

    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        sources[module_name] = Source(module_name, BUILTIN_DISTRIBUTION)
    if autoload:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.has_plugin(ep.name) or ep.name in sources:
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as e:  # a broken plugin must not take the others down
                registry.failures.append((ep.name, f"{type(e).__name__}: {e}"))
                continue
            sources[ep.name] = Source(ep.name, _distribution_of(ep))

    for kind in _KINDS:
        hook = getattr(pm.hook, f"register_{kind}")
        for impl in hook.get_hookimpls():  # registration order: built-ins first
            source = sources[impl.plugin_name]

            def register(spec, _kind=kind, _source=source):
                registry._add(_kind, spec, _source)

            try:
                impl.function(register=register)
            except Exception as e:
                registry.failures.append((impl.plugin_name, f"{type(e).__name__}: {e}"))
    return registry


_cached: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    global _cached
    if _cached is None:
        _cached = build_registry()
    return _cached
