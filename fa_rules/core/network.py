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
"""

from __future__ import annotations

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

    # -- module forward (used through call_with) ------------------------------------------------
    def forward(self, x: torch.Tensor, all_activations: bool = False):
        """The network's output (a dict of heads, if any); with `all_activations`, `(block outputs, output)`."""
        hs = []
        for block in self.blocks:
            x = block(x)
            hs.append(x)
        if len(self.heads):
            out = {n: h(x) for n, h in self.heads.items()}
        elif self.out_shape is not None and len(self.out_shape) > 1:
            out = x.reshape(x.shape[0], *self.out_shape)  # e.g. an MLP decoder's image
        else:
            out = x
        return (hs, out) if all_activations else out

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

    def head_apply(self, name: str, params: Params, h: torch.Tensor) -> torch.Tensor:
        """Head `name` applied to the last block's output `h`, with the head's parameters taken from `params`."""
        local = {lk: params[k] for k, lk in self.head_keys[name].items()}
        return call_with(self.heads[name], local, (h,))

    def block_of(self, key: str) -> int | None:
        """Index of the block owning parameter `key` (None for head parameters)."""
        parts = key.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None


def as_network(model, in_shape: Sequence[int], out_shape: Sequence[int] | None, family: str = "custom") -> Network:
    """A user's model in the block view: a `Network` as it is; an `nn.Sequential`, a list of
    modules, or a module whose `blocks` attribute is a Sequential / ModuleList, as that sequence
    of blocks (each any module from tensor to tensor; the last one's output are the logits)."""
    if isinstance(model, Network):
        return model
    if isinstance(model, (list, tuple, nn.ModuleList, nn.Sequential)):
        blocks = list(model)
    elif isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        inside = {id(p) for p in model.blocks.parameters()}
        outside = [k for k, p in model.named_parameters() if id(p) not in inside]
        if outside:
            raise UserError(f"model '{family}' has parameters outside its blocks ({', '.join(outside[:3])}); "
                            "put every layer in its `blocks` sequence")
        blocks = list(model.blocks)
    else:
        raise UserError(f"model '{family}' returned a {type(model).__name__}: give an nn.Sequential of blocks, "
                        "a list of blocks, or a module with a `blocks` Sequential")
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise UserError(f"model '{family}' has no blocks, or a block that is not an nn.Module")
    for i, block in enumerate(blocks):
        for name, m in block.named_modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                # an update of running buffers inside a gradient transform is a mutation torch.func refuses
                raise UserError(f"model '{family}': block {i}'s {type(m).__name__} {name or ''} keeps running "
                                "statistics; build it with track_running_stats=False (the network must be a pure "
                                "function of its parameters)")
    return Network(blocks, family=family, in_shape=in_shape, out_shape=out_shape)


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
        self._check_fits_memory(in_shape, out_shape, heads, options, changed)
        try:
            with warnings.catch_warnings(record=True) as caught:  # shown once the model is built
                warnings.simplefilter("always")
                network = as_network(self.build(tuple(in_shape), tuple(out_shape), heads, **options), in_shape,
                                     out_shape, family=self.name)
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
                probe = as_network(self.build(tuple(in_shape), tuple(out_shape), heads, **options), in_shape,
                                   out_shape, family=self.name)
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
