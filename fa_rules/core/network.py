"""The functional network view every rule works on.

A network is an ordered sequence of blocks. A layered block (`Block`) is `reshape -> layer ->
activation -> post`, where `layer` is the parametrised map (Linear, Conv2d, ConvTranspose2d),
`activation` is explicit and `post` is an optional parameter-free or batch-statistics module
(pooling, batch norm). Any other module whose input and output are tensors is a block too (a
residual unit, He, Zhang, Ren & Sun 2016, "Deep residual learning for image recognition", CVPR):
block-level rules see it as one step of the chain, layer-level feedback reaches every Linear and
convolution inside it, and rules that need a block's layer/activation structure (inverting it,
sending a signal forward through its layer) refuse it with `Network.require_layered`. Named heads
(e.g. `mu` / `logvar`) may follow the last block. Parameters live outside the module as a flat dict
`{"blocks.0.layer.weight": tensor, ...}` and are applied with `call_with` (`functional_call`'s
semantics at less cost), so rules can differentiate with respect to any subset of them.

Any module is a network (`as_network`): a Sequential's items are its blocks, any other module is cut
at split points (`fa_rules.core.split`). Buffers stay in the modules and are the engine's state, like
rule state: batch norm's running statistics are not updated inside a rule's step (a mutation that
`torch.func` transforms refuse). In training mode a tracked batch norm normalises with the batch's
statistics and changes nothing; the engine records, for each one, the statistics of its first
training-mode call in a step (`recording_statistics`), and updates the running buffers after the step
as torch's own forward does (`update_running_statistics`: momentum, or the cumulative average when
`momentum` is None, the unbiased variance, `num_batches_tracked`). In evaluation mode the running
statistics normalise, as in torch.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from fa_rules.core.errors import UserError

Params = dict[str, torch.Tensor]

# module -> {parameter name: (owning submodule, attribute)}, or None where the fast swap is unsafe
_SLOTS: "weakref.WeakKeyDictionary[nn.Module, dict | None]" = weakref.WeakKeyDictionary()


def parameter_slots(module: nn.Module) -> dict | None:
    """`{parameter name: (owning submodule, attribute)}` of `module`, found once; None where a
    weight is tied or parametrised."""
    if module not in _SLOTS:
        slots: dict | None = {}
        for name, _ in module.named_parameters(remove_duplicate=False):
            prefix, _, leaf = name.rpartition(".")
            slots[name] = (module.get_submodule(prefix), leaf)
        tied = len(slots) != len(dict(module.named_parameters()))
        if tied or any(parametrize.is_parametrized(m) for m in module.modules()):
            slots = None  # tied or parametrised weights: functional_call's general handling
        _SLOTS[module] = slots
    return _SLOTS[module]


def call_with(module: nn.Module, params: Params, args: tuple = (), kwargs: dict | None = None):
    """`torch.func.functional_call(module, params, args, kwargs)` for a dict of parameters: the
    tensors stand in for the module's parameters during the call (under `torch.func` transforms
    too), at a fraction of the cost. `functional_call` walks the module tree and checks for tied
    weights on every call, which is most of the engine's overhead on small steps; here the
    parameter slots are found once per module and swapped directly. Under `torch.compile` tracing,
    with tied or parametrised weights, or keys that are not parameters, it is `functional_call`."""
    slots = None if torch.compiler.is_compiling() else parameter_slots(module)
    if slots is None or not params.keys() <= slots.keys():
        return functional_call(module, params, args, kwargs)
    swapped = []
    try:
        for key, value in params.items():
            owner, leaf = slots[key]
            swapped.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = value
        return module(*args, **(kwargs or {}))
    finally:
        for owner, leaf, original in reversed(swapped):
            owner._parameters[leaf] = original


class Asinh(nn.Module):
    """asinh activation: unbounded, invertible (sinh), the local feature alignment default."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.asinh(x)


_ACTIVATIONS = {
    "identity": nn.Identity,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "asinh": Asinh,
    "sigmoid": nn.Sigmoid,
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def make_activation(name: str) -> nn.Module:
    from fa_rules.core.errors import unknown_name_error

    if name not in _ACTIVATIONS:
        raise unknown_name_error("activation", name, list(_ACTIVATIONS))
    return _ACTIVATIONS[name]()


def inverse_activation(activation: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The exact inverse of an invertible activation (used to walk reconstructions backwards)."""
    if isinstance(activation, nn.Identity):
        return y
    if isinstance(activation, Asinh):
        return torch.sinh(y)
    if isinstance(activation, nn.Tanh):
        return torch.atanh(y.clamp(-1 + 1e-6, 1 - 1e-6))
    if isinstance(activation, nn.LeakyReLU):
        return torch.where(y >= 0, y, y / activation.negative_slope)
    if isinstance(activation, nn.Sigmoid):
        return torch.logit(y, eps=1e-6)
    raise ValueError(f"activation {type(activation).__name__} has no inverse")


def max_pool_with_indices(pool: nn.MaxPool2d, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pool(z)` and the flat positions (per example and channel plane) where it took its maxima:
    what max-unpooling, or a pool evaluated at fixed positions, needs."""
    return torch.nn.functional.max_pool2d(z, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                          ceil_mode=pool.ceil_mode, return_indices=True)


class Block(nn.Module):
    """`reshape(in_shape) -> layer -> activation -> post`; `in_shape` excludes the batch dimension."""

    def __init__(
        self,
        layer: nn.Module,
        activation: nn.Module | None = None,
        post: nn.Module | None = None,
        in_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        self.layer = layer
        self.activation = activation if activation is not None else nn.Identity()
        self.post = post if post is not None else nn.Identity()
        self.in_shape = tuple(in_shape) if in_shape is not None else None

    def forward(self, x: torch.Tensor, pre_activation: bool = False) -> torch.Tensor:
        """The block's output; with `pre_activation`, the layer's output before the activation."""
        if self.in_shape is not None:
            x = x.reshape(x.shape[0], *self.in_shape)
        a = self.layer(x)
        if pre_activation:
            return a
        return self.post(self.activation(a))


class Network(nn.Module):
    """Blocks plus optional heads, with a functional API over an explicit parameter dict."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        heads: dict[str, Block] | None = None,
        family: str = "custom",
        in_shape: Sequence[int] = (),
        out_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleDict(heads or {})
        self.family = family
        self.options: dict[str, Any] = {}  # the model settings it was built with (set by ModelSpec.make)
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape) if out_shape is not None else None
        # global key -> key local to its block/head, computed once (cheap per-block calls later)
        self.block_keys: list[dict[str, str]] = [
            {f"blocks.{i}.{k}": k for k, _ in b.named_parameters()} for i, b in enumerate(self.blocks)
        ]
        self.head_keys: dict[str, dict[str, str]] = {
            n: {f"heads.{n}.{k}": k for k, _ in h.named_parameters()} for n, h in self.heads.items()
        }
        self.param_keys = frozenset(k for k, _ in self.named_parameters())
        self.split_note: str | None = None  # why a user's module stayed one block (`fa_rules.core.split`)
        self.tracked_norms = _track_norms(self)

    # -- module forward (used through call_with) ------------------------------------------------
    def forward(self, x: torch.Tensor, all_activations: bool = False):
        """The network's output (a dict of heads, if any); with `all_activations`, `(block outputs, output)`."""
        hs = []
        for block in self.blocks:
            x = block(x)
            hs.append(x)
        out = {n: h(x) for n, h in self.heads.items()} if len(self.heads) else self._shaped_output(x)
        return (hs, out) if all_activations else out

    def _shaped_output(self, h: torch.Tensor) -> torch.Tensor:
        """The last block's output as the network returns it (without heads): in `out_shape`."""
        if self.out_shape is not None and len(self.out_shape) > 1:
            return h.reshape(h.shape[0], *self.out_shape)  # e.g. an MLP decoder's image
        return h

    # -- functional API ----------------------------------------------------------------------------
    def init_params(self) -> Params:
        """A detached copy of the module's freshly initialised parameters."""
        return {k: v.detach().clone() for k, v in self.named_parameters()}

    @property
    def num_blocks(self) -> int:
        """How many blocks the body has (heads not counted)."""
        return len(self.blocks)

    def _check_keys(self, params: Params) -> None:
        # functional_call(strict=True) does this too, but costs a module walk per call
        if params.keys() != self.param_keys:
            missing, extra = self.param_keys - params.keys(), params.keys() - self.param_keys
            raise KeyError(f"parameter dict does not match the network (missing {sorted(missing)}, extra {sorted(extra)})")

    def apply(self, params: Params, x: torch.Tensor):
        """Network output: the last block's activation, or a dict of head outputs."""
        self._check_keys(params)
        return call_with(self, params, (x,))

    def activations(self, params: Params, x: torch.Tensor):
        """`([h_1, ..., h_L], output)` for one forward pass."""
        self._check_keys(params)
        return call_with(self, params, (x,), {"all_activations": True})

    def block_params(self, i: int, params: Params) -> Params:
        """Block i's parameters, keyed locally (`layer.weight`)."""
        return {local: params[k] for k, local in self.block_keys[i].items()}

    def block_apply(self, i: int, params: Params, x: torch.Tensor, pre_activation: bool = False):
        """Apply block i. `params` may be the whole dict or just this block's (global keys)."""
        local = {lk: params[k] for k, lk in self.block_keys[i].items()}
        return self.block_apply_local(i, local, x, pre_activation)

    def block_apply_local(self, i: int, local_params: Params, x: torch.Tensor, pre_activation=False):
        """Apply block i with parameters keyed locally (`layer.weight`)."""
        if not pre_activation:  # any block module takes just its input
            return call_with(self.blocks[i], local_params, (x,))
        self.require_layered("a pre-activation", blocks=(i,))
        return call_with(self.blocks[i], local_params, (x,), {"pre_activation": True})

    def require_layered(self, what: str, rule: str | None = None, blocks=None) -> None:
        """A one-line UserError unless every block (or those in `blocks`) is a layered `Block`:
        `what` names what the rule needs that only the layered form has (an invertible block, a
        layer to send a signal forward through)."""
        for i in range(self.num_blocks) if blocks is None else blocks:
            if not isinstance(self.blocks[i], Block):
                who = f"rule '{rule}' needs" if rule else "this needs"
                raise UserError(f"{who} {what} (a layer -> activation -> post block); block {i} is a "
                                f"{type(self.blocks[i]).__name__}")

    def require_blocks(self, rule: str, what: str = "a chain of blocks") -> None:
        """A one-line UserError unless the body has at least two blocks: with one, a rule that
        treats the hidden blocks differently from the output block would silently be backprop."""
        if self.num_blocks < 2:
            why = self.split_note or f"the network has {self.num_blocks} block"
            raise UserError(f"rule '{rule}' needs {what}; {why}. Name split points with --model-opt "
                            "blocks=NAME,NAME,... (submodules in call order)")

    def buffer_dict(self) -> dict[str, torch.Tensor]:
        """Every buffer of the network by name (running statistics among them): the engine's state."""
        return dict(self.named_buffers())

    def output_apply(self, params: Params, h: torch.Tensor):
        """What the network returns for its last block's output `h`: its heads' outputs (their
        parameters from `params`), or `h` in `out_shape`."""
        if len(self.heads):
            return {name: self.head_apply(name, params, h) for name in self.heads}
        return self._shaped_output(h)

    def head_apply(self, name: str, params: Params, h: torch.Tensor) -> torch.Tensor:
        """Head `name` applied to the last block's output `h`, with the head's parameters taken from `params`."""
        local = {lk: params[k] for k, lk in self.head_keys[name].items()}
        return call_with(self.heads[name], local, (h,))

    def block_of(self, key: str) -> int | None:
        """Index of the block owning parameter `key` (None for head parameters)."""
        parts = key.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None


def as_network(model, in_shape: Sequence[int], out_shape: Sequence[int] | None, family: str = "custom",
               blocks: Sequence[str] | None = None, input_adapter: nn.Module | None = None) -> Network:
    """A user's model in the block view: a `Network` as it is; an `nn.Sequential`, a list of
    modules, or a module whose `blocks` attribute is a Sequential / ModuleList, as that sequence
    of blocks (each any module from tensor to tensor; the last one's output are the logits); any
    other module cut at `blocks` (submodule names), by default after each top-level child that owns
    parameters (`fa_rules.core.split`). `input_adapter`, a module that runs on the input first
    (e.g. grey images to a 3-channel design), becomes part of the first block. The module itself
    becomes the network's (its batch norms tracked by the engine, see the module docstring): hand a
    copy to keep using the original outside fa-rules, as `ModelSpec.from_module` does."""
    from fa_rules.core.split import AdaptedModule, grey_input_adapter, module_blocks

    if isinstance(model, AdaptedModule) and input_adapter is None:  # (a builder's module with its adapter)
        model, input_adapter = model.model, model.input_adapter
    if not isinstance(model, nn.Module) and not isinstance(model, (list, tuple)):
        raise UserError(f"model '{family}' returned a {type(model).__name__}, not an nn.Module")
    note = None
    if isinstance(model, Network) or isinstance(model, (list, tuple, nn.ModuleList, nn.Sequential)) or \
            isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        if blocks is not None:
            raise UserError(f"model '{family}' is already a sequence of blocks; blocks= names split points of "
                            "other modules")
        if isinstance(model, Network):
            return model
    if isinstance(model, (list, tuple, nn.ModuleList, nn.Sequential)):
        parts = list(model)
        if input_adapter is None and parts and all(isinstance(b, nn.Module) for b in parts):
            input_adapter = grey_input_adapter(nn.Sequential(*parts), in_shape)
    elif isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        inside = {id(p) for p in model.blocks.parameters()}
        outside = [k for k, p in model.named_parameters() if id(p) not in inside]
        if outside:
            raise UserError(f"model '{family}' has parameters outside its blocks ({', '.join(outside[:3])}); "
                            "put every layer in its `blocks` sequence")
        parts = list(model.blocks)
    else:
        if input_adapter is None:  # a 3-channel design handed grey images: repeated to three channels
            input_adapter = grey_input_adapter(model, in_shape)
        parts, note = module_blocks(model, blocks, family, input_adapter)
        input_adapter = None
    if not parts or not all(isinstance(b, nn.Module) for b in parts):
        raise UserError(f"model '{family}' has no blocks, or a block that is not an nn.Module")
    if input_adapter is not None:
        parts[0] = AdaptedModule(input_adapter, parts[0])
    network = Network(parts, family=family, in_shape=in_shape, out_shape=out_shape)
    network.split_note = note
    return network


# -- buffers: running statistics as engine state -----------------------------------------------------
# While the engine records a step: {id(batch norm): (mean, unbiased variance) of its first training-mode
# input, or None before it ran}; None when nothing records
_RECORDING: dict[int, tuple[torch.Tensor, torch.Tensor] | None] | None = None


def _track_norms(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """The batch norms of `network` that keep running statistics, made pure in training mode (they
    normalise by the batch and change no buffer; see the module docstring); others are refused."""
    tracked = []
    for name, m in network.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            if "forward" not in vars(m):
                # torch's forward passes the running buffers only `if not training or track_running_stats`:
                # with the flag off, training mode reads and writes no buffer, evaluation mode reads them
                m.track_running_stats = False
                object.__setattr__(m, "forward", functools.partial(_tracked_batch_norm, m))
            tracked.append((name, m))
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise UserError(f"{type(m).__name__} {name} keeps running statistics, which the engine does not "
                            "carry for instance norms; build it with track_running_stats=False")
    return tracked


def _tracked_batch_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A tracked batch norm's forward: torch's own in evaluation mode (running statistics); in
    training mode normalised by the batch, and, while the engine records a step and this is the
    module's first call in it, the batch's mean and unbiased variance kept for the update."""
    if not module.training:
        return type(module).forward(module, x)
    recording = _RECORDING
    wanted = recording is not None and id(module) in recording and recording[id(module)] is None
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        # the CPU kernel torch's forward calls, which returns the statistics it normalised with
        module._check_input_dim(x)
        out, mean, invstd = torch.native_batch_norm(x, module.weight, module.bias, None, None, True, 0.0, module.eps)
        if wanted:
            n = x.numel() // x.shape[1]
            var = (invstd.detach() ** -2 - module.eps) * (n / max(n - 1, 1))
            recording[id(module)] = (mean.detach(), var)
        return out
    out = type(module).forward(module, x)  # (cuDNN where torch picks it)
    if wanted:
        xd = x.detach()
        var, mean = torch.var_mean(xd, dim=[d for d in range(xd.dim()) if d != 1], correction=1)
        recording[id(module)] = (mean, var)
    return out


class recording_statistics:
    """`with recording_statistics(network) as stats:` the batch statistics of the network's tracked
    batch norms during the block (their first training-mode call each); then
    `update_running_statistics(network, stats)`."""

    def __init__(self, network: Network):
        self.network = network

    def __enter__(self) -> dict:
        global _RECORDING
        self.previous = _RECORDING
        _RECORDING = {id(m): None for _, m in self.network.tracked_norms}
        return _RECORDING

    def __exit__(self, *exc) -> None:
        global _RECORDING
        _RECORDING = self.previous


def update_running_statistics(network: Network, stats: dict) -> None:
    """Each tracked batch norm's running buffers moved toward the recorded batch statistics, as
    torch's training-mode forward moves them (its CPU and CUDA kernels: `(1 - m) r + m s`)."""
    with torch.no_grad():
        for _, m in network.tracked_norms:
            recorded = stats.get(id(m))
            if recorded is None:
                continue
            mean, var = recorded
            m.num_batches_tracked.add_(1)
            factor = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
            m.running_mean.mul_(1 - factor).add_(mean.to(m.running_mean.dtype), alpha=factor)
            m.running_var.mul_(1 - factor).add_(var.to(m.running_var.dtype), alpha=factor)


SPLIT_OPTION = "blocks"


def count_params(params: Params) -> int:
    return sum(p.numel() for p in params.values())


def flat_size(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


@dataclass(frozen=True)
class ModelSpec:
    """A registered model family: builder, settings with defaults, and a shape it accepts."""

    name: str
    build: Callable[..., Network]
    summary: str
    options: dict[str, Any] = field(default_factory=dict)
    example_shape: tuple[int, ...] = (1, 8, 8)

    def __post_init__(self):
        # every model takes `blocks`: its split points (`as_network`), never passed to the builder
        if SPLIT_OPTION not in self.options:
            object.__setattr__(self, "options", {**self.options, SPLIT_OPTION: ""})

    @classmethod
    def from_factory(cls, factory: Callable[..., Any], name: str | None = None, summary: str | None = None,
                     example_shape: tuple[int, ...] = (1, 8, 8)) -> "ModelSpec":
        """A model family from a plain factory `factory(in_shape, out_shape, **options)` returning
        an `nn.Module` (see `as_network`): named after the function, summarised by its docstring's
        first line, its options the keyword arguments with defaults (so `--model-opt` reaches them)."""
        name = name or factory.__name__
        options = {p.name: p.default for p in inspect.signature(factory).parameters.values()
                   if p.default is not inspect.Parameter.empty}
        doc = (inspect.getdoc(factory) or "").strip()

        def build(in_shape, out_shape, heads=None, **opts):
            if heads:
                raise UserError(f"model '{name}' is a plain factory and builds no heads ({', '.join(heads)})")
            return factory(in_shape, out_shape, **opts)

        return cls(name, build, summary or (doc.splitlines()[0] if doc else name), options, example_shape)

    @classmethod
    def from_module(cls, model, prefix: str = "python:") -> "ModelSpec":
        """A model family from a module handed to the Python API: an `nn.Module` instance (each
        network built is a copy of it, so every run starts from its weights as they were), a
        factory `factory(in_shape, out_shape, **options)` (`from_factory`), or a factory called
        with its keyword settings only (a class such as `MyNet`, `lambda: resnet18(num_classes=10)`),
        its settings reachable as model options. Named `prefix` + the class or function name."""
        if isinstance(model, nn.Module):
            instance, name = model, prefix + type(model).__name__

            def build(in_shape, out_shape, heads=None):
                if heads:
                    raise UserError(f"model '{name}' is a module as it is and builds no heads ({', '.join(heads)})")
                return copy.deepcopy(instance)

            return cls(name, build, f"the {type(model).__name__} module handed to the Python API")
        if not callable(model):
            raise UserError(f"model must be a name, an nn.Module or a factory returning one, not a "
                            f"{type(model).__name__}")
        name = prefix + getattr(model, "__name__", type(model).__name__)
        try:
            parameters = list(inspect.signature(model).parameters.values())
        except (TypeError, ValueError):
            parameters = []
        required = [p for p in parameters if p.default is inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(required) >= 2:
            return cls.from_factory(model, name=name)
        options = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
                   and type(p.default) in (bool, int, float, str)}

        def build_from_settings(in_shape, out_shape, heads=None, **settings):
            if heads:
                raise UserError(f"model '{name}' is a plain factory and builds no heads ({', '.join(heads)})")
            return model(**settings)

        return cls(name, build_from_settings, f"{name[len(prefix):]} handed to the Python API", options)

    def make(self, in_shape, out_shape, heads=None, **overrides) -> Network:
        """The network for these shapes with the family's settings, `overrides` replacing defaults (unknown ones are a UserError)."""
        unknown = set(overrides) - set(self.options)
        if unknown:
            raise UserError(
                f"model '{self.name}' has no option {', '.join(sorted(unknown))} "
                f"(options: {', '.join(sorted(self.options)) or 'none'})"
            )
        options = {**self.options, **overrides}
        changed = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "its defaults"
        builder_options = {k: v for k, v in options.items() if k != SPLIT_OPTION}
        split_points = [n.strip() for n in str(options[SPLIT_OPTION]).split(",") if n.strip()] or None
        self._check_fits_memory(in_shape, out_shape, heads, builder_options, changed)
        try:
            with warnings.catch_warnings(record=True) as caught:  # shown once the model is built
                warnings.simplefilter("always")
                network = as_network(self.build(tuple(in_shape), tuple(out_shape), heads, **builder_options),
                                     in_shape, out_shape, family=self.name, blocks=split_points)
        except UserError:
            raise
        except Exception as e:  # torch's own refusal of a size (0 channels, too much memory) is the user's setting
            raise UserError(f"model '{self.name}' cannot be built with {changed} for inputs {tuple(in_shape)}: "
                            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        network.options = options  # what it was built with (rules size their own networks from it)
        return network

    def _check_fits_memory(self, in_shape, out_shape, heads, options: dict, changed: str) -> None:
        """Refuse, in one line, a model whose weights and their gradients alone exceed the memory
        available: built layer by layer, it would fill the memory and be killed by the system (or
        swap for hours) instead. Counted on the meta device, which allocates nothing; a family that
        cannot be built there is left to the real build. The builder's own refusals (a size beyond
        its declared range) come first: counting an absurd depth would itself take minutes."""
        available = available_memory()
        if available is None:
            return
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                probe = self.build(tuple(in_shape), tuple(out_shape), heads, **options)
            probe = probe if isinstance(probe, nn.Module) else nn.ModuleList(probe)
            count = sum(p.numel() for p in probe.parameters())
            weight_bytes = sum(p.numel() * p.element_size() for p in probe.parameters())
        except UserError:
            raise
        except Exception:
            return
        if 2 * weight_bytes > available:
            raise UserError(f"model '{self.name}' with {changed} has {count / 1e9:.3g} G parameters: "
                            f"{2 * weight_bytes / 2**30:.3g} GiB for its weights and their gradients alone, more "
                            f"than the {available / 2**30:.3g} GiB of memory available")


def available_memory() -> int | None:
    """Bytes of memory the system can give this process now (Linux's MemAvailable), or None where
    it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
