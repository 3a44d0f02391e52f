"""A user's module as a chain of blocks: split points on the module as it is, found with torch.fx.

Block-level rules (DFA, DRTP, local losses) need a network's forward as a chain `x -> block_0 ->
block_1 -> ... -> logits`, each block runnable on its own (`Network.block_apply`). A user's module
(a torchvision ResNet, a researcher's own class) is not written that way: its `forward` calls
submodules and functions (`torch.flatten`, a residual addition) in between. Here the module is traced
symbolically (`torch.fx`) and its graph cut after each *split point*, a named submodule:

- by default the module's top-level children that own parameters, in the order its forward calls
  them (ResNet-18: `conv1 | bn1 | relu, maxpool, layer1 | layer2 | layer3 | layer4 | avgpool,
  flatten, fc`); parameter-free children and functions join the block after them;
- or the names a user gives (`--model-opt blocks=layer1,layer2,layer3,layer4,fc`), nested names
  (`layer1.0`) included; everything after the last split point joins the last block.

A block is a `torch.fx.GraphModule` holding the user's own submodules (shared, not copied: their
parameters are the model's, keyed by their own names, `conv1.weight`). Only the module and the
ancestors of split points are traced; every other submodule is called as a whole, so its own control
flow, hooks and functional code run as written. A cut must be crossed by the split point's output
alone: a value made before it and used after it (a skip connection around it) makes that split
impossible, and the message names the value. A module that cannot be traced, or a default split that
is impossible, stays one block, with the reason kept (`Network.split_note`) for the rules that need
a chain to quote.

A module built for 3-channel images and handed grey ones (torchvision's designs, as they are) gets
an `InputAdapter` in its first block, which repeats the grey channel three times
(`grey_input_adapter`; found by trying both on zeros).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from fa_rules.core.errors import UserError


class SplitImpossible(Exception):
    """The module cannot be cut at these split points (the message says why, in one line)."""


class _Tracer(fx.Tracer):
    """Traces only `module` itself and the ancestors of split points: every other submodule is one
    call, as the user wrote it."""

    def __init__(self, traced: set[str]):
        super().__init__()
        self.traced = traced

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return qualified_name not in self.traced


def _ancestors(names: Sequence[str]) -> set[str]:
    """`{"", "layer1"}` for `["layer1.0"]`: the modules a trace must enter to reach the names."""
    out = {""}
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def trace(module: nn.Module, split_points: Sequence[str]) -> fx.Graph:
    """The graph of `module.forward`, each split point (and every submodule not on the way to one)
    a single `call_module` node."""
    try:
        return _Tracer(_ancestors(split_points)).trace(module)
    except Exception as e:  # control flow on values, an unsupported call: fx's own message, first line
        raise SplitImpossible(f"torch.fx cannot trace its forward ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]})") from None


def default_split_points(module: nn.Module) -> tuple[list[str], fx.Graph]:
    """The top-level children that own parameters, in the order `module.forward` calls them, and the
    graph they were found in (the one `split_module` cuts at top-level names: traced once)."""
    children = [name for name, _ in module.named_children()]
    graph = trace(module, children)
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    owners = {name for name, child in module.named_children() if any(True for _ in child.parameters())}
    points = [name for name in called if name in owners]
    return [name for name in dict.fromkeys(points) if points.count(name) == 1], graph


def _stage_graph(nodes: list[fx.Node], entry: fx.Node | None, exit_node: fx.Node) -> fx.Graph:
    """A graph `x -> (nodes) -> exit_node's value`, `entry` (the previous cut's value, or the
    module's input) becoming the placeholder."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    env: dict[fx.Node, fx.Node] = {} if entry is None else {entry: x}
    for node in nodes:
        if node.op == "placeholder":
            env[node] = x
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[exit_node])
    return graph


def split_module(module: nn.Module, split_points: Sequence[str], input_adapter: nn.Module | None = None,
                 graph: fx.Graph | None = None) -> list[nn.Module]:
    """`module` cut after each of `split_points` (qualified submodule names): a list of blocks
    whose composition is `module.forward` (`input_adapter`, if given, runs first, inside block 0).
    `graph`: `trace(module, split_points)` when the caller has it already. Raises `SplitImpossible`
    with the reason in one line."""
    names = dict(module.named_modules())
    for name in split_points:
        if name not in names or name == "":
            raise SplitImpossible(f"it has no submodule '{name}' (top-level children: "
                                  f"{', '.join(n for n, _ in module.named_children()) or 'none'})")
    graph = graph if graph is not None else trace(module, split_points)
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise SplitImpossible(f"its forward takes {len(inputs)} inputs; a model takes one batch")
    output = next(n for n in nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        raise SplitImpossible(f"its forward returns a {type(output.args[0]).__name__}, not one tensor")
    position = {n: i for i, n in enumerate(nodes)}
    cuts = []
    for name in split_points:
        calls = [n for n in nodes if n.op == "call_module" and n.target == name]
        if len(calls) != 1:
            raise SplitImpossible(f"its forward calls '{name}' {len(calls)} times; a split point is called once")
        cuts.append(calls[0])
    cuts.sort(key=position.__getitem__)
    if not cuts or cuts[-1] is not output.args[0]:
        cuts.append(output.args[0])  # what follows the last split point is the last block
    blocks, start, entry = [], 0, None
    for cut in cuts:
        end = position[cut] + 1
        stage = [n for n in nodes[start:end] if n.op != "output"]
        inside = set(stage)
        for node in stage:
            for used in node.all_input_nodes:
                if used not in inside and used is not entry and used.op != "get_attr":
                    raise SplitImpossible(f"'{_named(used)}' crosses the cut after '{_named(entry)}' (used by "
                                          f"'{_named(node)}': a connection around the split)")
        # get_attr nodes (a parameter or constant the forward reads directly) go to every block using them
        attrs = [n for n in {u for node in stage for u in node.all_input_nodes} if n.op == "get_attr" and n not in inside]
        stage_graph = _stage_graph(sorted(attrs, key=position.__getitem__) + stage, entry, cut)
        blocks.append(fx.GraphModule(module, stage_graph, class_name="SplitBlock"))
        start, entry = end, cut
    if input_adapter is not None:
        _prepend(blocks[0], input_adapter)
    return blocks


def _named(node: fx.Node | None) -> str:
    if node is None:
        return "the input"
    return node.target if node.op == "call_module" else node.name


def _prepend(block: fx.GraphModule, adapter: nn.Module) -> None:
    """Run `adapter` on the block's input first (a submodule `input_adapter` of the block)."""
    block.add_submodule("input_adapter", adapter)
    graph = block.graph
    x = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(x):
        adapted = graph.call_module("input_adapter", (x,))
    x.replace_all_uses_with(adapted, delete_user_cb=lambda user: user is not adapted)
    block.recompile()


class InputAdapter(nn.Module):
    """Images with `in_channels` channels (1 or 3) to a 3-channel design: grey repeated to three
    channels (a view, no copy), then, with `size`, resized bilinearly to `size` x `size`."""

    def __init__(self, in_channels: int, size: int = 0):
        super().__init__()
        self.in_channels = in_channels
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, *x.shape[2:])
        if self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, size={self.size or 'unchanged'}"


class AdaptedModule(nn.Module):
    """`model(input_adapter(x))`: a module that could not be split, with its input adapter."""

    def __init__(self, input_adapter: nn.Module, model: nn.Module):
        super().__init__()
        self.input_adapter = input_adapter
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.input_adapter(x))


def grey_input_adapter(module: nn.Module, in_shape: Sequence[int]) -> nn.Module | None:
    """An `InputAdapter` for grey images when `module` takes 3-channel images and not these (a
    torchvision design handed over as it is), else None. Tried on two zero images in evaluation
    mode without a graph: only when the grey images fail and 3-channel ones pass."""
    if len(in_shape) != 3 or in_shape[0] != 1:
        return None
    like = next(iter(module.parameters()), None)
    if like is None or like.device.type == "meta":
        return None

    def takes(channels: int) -> bool:
        try:
            with torch.no_grad():
                module(torch.zeros(2, channels, *in_shape[1:], dtype=like.dtype, device=like.device))
            return True
        except Exception:
            return False

    training = module.training
    module.eval()
    try:
        return InputAdapter(1) if not takes(1) and takes(3) else None
    finally:
        module.train(training)


def module_blocks(module: nn.Module, split_points: Sequence[str] | None, family: str,
                  input_adapter: nn.Module | None = None) -> tuple[list[nn.Module], str | None]:
    """`(blocks, note)`: `module` cut at the split points (None: the default ones), with `note` None;
    or, where the default split is impossible, `[module]` and the reason. A split the user named
    that is impossible is a UserError."""
    try:
        graph = None
        if split_points is None:
            points, graph = default_split_points(module)
            if len(points) < 2:
                raise SplitImpossible(f"it has {len(points)} top-level {'child' if len(points) == 1 else 'children'} "
                                      "with parameters")
        else:
            points = list(split_points)
        return split_module(module, points, input_adapter, graph), None
    except SplitImpossible as e:
        if split_points is not None:
            raise UserError(f"model '{family}' cannot be split at blocks={','.join(split_points)}: {e}") from None
        whole = module if input_adapter is None else AdaptedModule(input_adapter, module)
        return [whole], f"model '{family}' is one block: {e}"
