"""A user's module as a chain of blocks (`fa_rules.core.split`, `as_network`) and torchvision's models
by name (`fa_rules.plugins.torchvision_models`).

The split is checked against the module itself: the chain of blocks must compute what the module's own
forward computes (float64, to 1e-12) in training and evaluation mode, with the module's own parameter
tensors; a split that cannot be made (a skip connection around the cut, a name the module lacks, a
submodule called twice, control flow torch.fx cannot trace) is one line saying why."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fa_rules.core.errors import UserError
from fa_rules.core.network import as_network, recording_statistics, update_running_statistics
from fa_rules.plugins.manager import get_registry
from fa_rules.plugins.torchvision_models import InputAdapter

RESNET_CHILDREN = "conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc"


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message.strip() and "\n" not in message, message
    return message


def _resnet18(seed: int = 0) -> nn.Module:
    """A float64 resnet18 whose batch norms are not at their initial values (affine parameters and
    running statistics drawn at random), so that evaluation mode tests the running statistics."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def _inputs(n: int = 4, shape=(3, 32, 32), seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _block_owners(network, depth: int = 1) -> list[list[str]]:
    """Each block's parameter names cut to their first `depth` path components (`layer1`, `layer1.0`)."""
    return [sorted({".".join(k.split(".")[:depth]) for k, _ in block.named_parameters()})
            for block in network.blocks]


def _references(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """(evaluation-mode output, training-mode output, the copy after its training-mode forward) of a
    copy of `model` taken before it is split (splitting marks its batch norms as tracked)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        evaluated = reference.eval()(x)
        trained = reference.train()(x)  # moves the copy's running statistics, as torch does
    return evaluated, trained, reference


# -- the default split -----------------------------------------------------------------------------------
def test_resnet18_default_split_is_its_parameter_owning_children_and_composes_to_its_forward():
    model, x = _resnet18(), _inputs()
    evaluated, trained, after_step = _references(model, x)
    network = as_network(model, (3, 32, 32), (10,), family="resnet18")

    assert network.split_note is None
    assert _block_owners(network) == [["conv1"], ["bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"], ["fc"]]
    assert "blocks.2.layer1.0.conv1.weight" in network.param_keys and "blocks.6.fc.bias" in network.param_keys
    assert len(network.param_keys) == len(list(model.parameters()))

    # the blocks hold the user's own parameters: same tensors, same storage
    owned = dict(model.named_parameters())
    for block in network.blocks:
        for name, p in block.named_parameters():
            assert p is owned[name] and p.data_ptr() == owned[name].data_ptr(), name

    params = network.init_params()
    before = {k: v.clone() for k, v in network.buffer_dict().items()}
    with torch.no_grad():
        network.train()
        torch.testing.assert_close(network.apply(params, x), trained, rtol=0, atol=1e-12)
        # the chain itself, block by block, is the same function
        h = x
        for i in range(network.num_blocks):
            h = network.block_apply(i, params, h)
        torch.testing.assert_close(h, trained, rtol=0, atol=1e-12)
        # a training-mode forward normalises by the batch and changes no buffer...
        for k, v in network.buffer_dict().items():
            assert torch.equal(v, before[k]), k
        network.eval()
        torch.testing.assert_close(network.apply(params, x), evaluated, rtol=0, atol=1e-12)
        # ...and recording it, then updating, moves the running statistics as torch's own forward did
        network.train()
        with recording_statistics(network) as stats:
            network.apply(params, x)
        update_running_statistics(network, stats)
    moved = dict(after_step.named_buffers())
    assert len(network.tracked_norms) == 20
    for key, value in network.buffer_dict().items():
        torch.testing.assert_close(value, moved[key.split(".", 2)[2]], rtol=0, atol=1e-12, msg=key)
    assert int(model.bn1.num_batches_tracked) == 1


# -- split points the user names -------------------------------------------------------------------------
def test_named_top_level_split_points_give_five_blocks_with_the_same_output():
    model, x = _resnet18(seed=2), _inputs()
    evaluated, trained, _ = _references(model, x)
    network = as_network(model, (3, 32, 32), (10,), family="resnet18",
                         blocks=["layer1", "layer2", "layer3", "layer4", "fc"])
    assert _block_owners(network) == [["bn1", "conv1", "layer1"], ["layer2"], ["layer3"], ["layer4"], ["fc"]]
    params = network.init_params()
    with torch.no_grad():
        torch.testing.assert_close(network.train().apply(params, x), trained, rtol=0, atol=1e-12)
        torch.testing.assert_close(network.eval().apply(params, x), evaluated, rtol=0, atol=1e-12)


def test_nested_split_points_cut_inside_a_stage():
    model, x = _resnet18(seed=3), _inputs()
    _, trained, _ = _references(model, x)
    network = as_network(model, (3, 32, 32), (10,), family="resnet18", blocks=["layer1.0", "layer1.1"])
    owners = _block_owners(network, depth=2)
    assert owners[0] == ["bn1.bias", "bn1.weight", "conv1.weight", "layer1.0"]
    assert owners[1] == ["layer1.1"]  # everything after the last split point is the last block
    assert owners[2] == ["fc.bias", "fc.weight", *[f"layer{s}.{u}" for s in (2, 3, 4) for u in (0, 1)]]
    with torch.no_grad():
        torch.testing.assert_close(network.train().apply(network.init_params(), x), trained, rtol=0, atol=1e-12)


def test_the_blocks_model_option_names_split_points():
    network = get_registry().model("torchvision:resnet18").make((3, 32, 32), (10,), blocks="layer2, layer4,fc")
    assert _block_owners(network) == [["bn1", "conv1", "layer1", "layer2"], ["layer3", "layer4"], ["fc"]]
    assert network.options["blocks"] == "layer2, layer4,fc"


def test_a_split_inside_a_residual_unit_names_the_value_that_crosses_it():
    with pytest.raises(UserError) as error:
        as_network(torchvision.models.resnet18(), (3, 32, 32), (10,), family="resnet18", blocks=["layer2.0.conv1"])
    message = _one_line(error)
    # layer2.0's input (layer1's output) is needed after conv1 by the shortcut (the downsample)
    assert message.startswith("model 'resnet18' cannot be split at blocks=layer2.0.conv1: ")
    assert "'layer1' crosses the cut after 'layer2.0.conv1'" in message and "downsample" in message


def test_an_unknown_split_point_lists_the_top_level_children():
    with pytest.raises(UserError) as error:
        as_network(torchvision.models.resnet18(), (3, 32, 32), (10,), family="resnet18", blocks=["layer1", "layer5"])
    message = _one_line(error)
    assert "no submodule 'layer5'" in message and f"(top-level children: {RESNET_CHILDREN})" in message


class SharedMiddle(nn.Module):
    """A stem, one layer applied twice (weights shared across two calls), a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.stem(x)))))))


def test_a_split_point_called_twice_is_refused_and_never_chosen_by_default():
    with pytest.raises(UserError) as error:
        as_network(SharedMiddle(), (6,), (3,), family="shared", blocks=["shared"])
    assert "its forward calls 'shared' 2 times; a split point is called once" in _one_line(error)

    torch.manual_seed(0)
    model = SharedMiddle().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = model(x).detach()
    network = as_network(model, (6,), (3,), family="shared")  # default: stem | shared, shared, head
    assert _block_owners(network) == [["stem"], ["head", "shared"]]
    with torch.no_grad():
        torch.testing.assert_close(network.apply(network.init_params(), x), expected, rtol=0, atol=1e-12)


# -- a module torch.fx cannot trace ----------------------------------------------------------------------
class Branchy(nn.Module):
    """Control flow on the data's values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(64, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        x = x.flatten(1)
        if x.sum() > 0:
            x = x - x.mean()
        return self.out(torch.relu(self.hidden(x)))


def test_an_untraceable_module_stays_one_block_and_block_rules_quote_why():
    torch.manual_seed(0)
    model = Branchy().double()
    x = _inputs(shape=(1, 8, 8))
    expected = model(x).detach()
    network = as_network(model, (1, 8, 8), (10,), family="python:Branchy")
    assert network.num_blocks == 1 and network.blocks[0] is model
    note = network.split_note
    assert note.startswith("model 'python:Branchy' is one block: torch.fx cannot trace its forward")
    assert "\n" not in note
    with torch.no_grad():
        torch.testing.assert_close(network.apply(network.init_params(), x), expected, rtol=0, atol=1e-12)

    rule = get_registry().rule("direct_feedback_alignment").make()
    with pytest.raises(UserError) as error:
        rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))
    message = _one_line(error)
    assert message.startswith("rule 'direct_feedback_alignment' needs") and note in message
    assert "--model-opt blocks=" in message

    with pytest.raises(UserError) as error:  # naming split points cannot help here
        as_network(Branchy(), (1, 8, 8), (10,), family="python:Branchy", blocks=["hidden"])
    assert "torch.fx cannot trace its forward" in _one_line(error)


# -- torchvision by name: the input adapter --------------------------------------------------------------
def _bare_twin(network) -> nn.Module:
    """A plain torchvision resnet18 with the network's weights and buffers, float64, evaluation mode."""
    bare = torchvision.models.resnet18(num_classes=10)
    state = {re.sub(r"^blocks\.\d+\.", "", k): v for k, v in network.state_dict().items()}
    bare.load_state_dict(state)  # strict: every key of the bare model is matched
    return bare.double().eval()


@pytest.mark.parametrize("image_size", [0, 64])
def test_grey_images_reach_a_three_channel_design_through_the_input_adapter(image_size):
    torch.manual_seed(0)
    options = {"image_size": image_size} if image_size else {}
    network = get_registry().model("torchvision:resnet18").make((1, 28, 28), (10,), **options).double().eval()
    adapter = network.blocks[0].input_adapter
    assert isinstance(adapter, InputAdapter) and adapter.in_channels == 1 and adapter.size == image_size
    assert _block_owners(network)[0] == ["conv1"]  # the adapter owns no parameters

    x = _inputs(n=3, shape=(1, 28, 28))
    three = x.repeat(1, 3, 1, 1)
    if image_size:
        three = F.interpolate(three, size=(image_size, image_size), mode="bilinear", align_corners=False)
    bare = _bare_twin(network)
    with torch.no_grad():
        logits = network.apply(network.init_params(), x)
        torch.testing.assert_close(logits, bare(three), rtol=0, atol=1e-12)
        if image_size:  # the resize matters: without it the same weights give other logits
            assert (logits - bare(x.repeat(1, 3, 1, 1))).abs().max() > 1e-3


# -- torchvision by name: mistakes, each one line ------------------------------------------------------
def test_an_unknown_torchvision_name_suggests_a_close_one():
    with pytest.raises(UserError) as error:
        get_registry().model("torchvision:resnt18")
    message = _one_line(error)
    assert message.startswith("unknown torchvision model 'resnt18' (did you mean: resnet18")


@pytest.mark.parametrize("shape, options, expected", [
    ((1, 28, 28), {"dilation": 2}, "has no option dilation (options: blocks, groups, image_size, width_per_group, "
                                   "zero_init_residual)"),
    ((1, 28, 28), {"image_size": -1}, "needs image_size in 0..1024 (0: as they are), got -1"),
    ((1, 28, 28), {"image_size": 1025}, "needs image_size in 0..1024 (0: as they are), got 1025"),
    ((4, 28, 28), {}, "takes images of 1 or 3 channels, not inputs of shape (4, 28, 28)"),
], ids=["option-it-does-not-take", "image-size-negative", "image-size-too-large", "four-channels"])
def test_torchvision_settings_it_cannot_take_are_one_line(shape, options, expected):
    with pytest.raises(UserError) as error:
        get_registry().model("torchvision:resnet18").make(shape, (10,), **options)
    message = _one_line(error)
    assert message.startswith("model 'torchvision:resnet18' ") and expected in message


def test_a_design_that_cannot_take_8px_digits_says_to_set_image_size():
    with pytest.raises(UserError) as error:
        get_registry().model("torchvision:alexnet").make((1, 8, 8), (10,))
    message = _one_line(error)
    assert message.startswith("this torchvision design cannot take (1, 8, 8) inputs: ")
    assert "--model-opt image_size=" in message
