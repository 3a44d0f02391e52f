"""torchvision's classification models by name: `--model torchvision:resnet18`.

Any name of `torchvision.models.list_models(module=torchvision.models)` (ResNets, MobileNets, VGG,
EfficientNets, ...), built by torchvision's own builder with `weights=None` (no download: every
rule starts from the same random initialisation, drawn from the run's seed) and `num_classes` from
the dataset. `--model-opt KEY=VALUE` reaches the builder's plain settings (those with a bool, int,
float or string default of the model class, e.g. `zero_init_residual`, `width_per_group`,
`dropout`), checked by type like every model option; `blocks` names split points
(`fa_rules.core.split`).

These designs take 3-channel images of 224 px. Data of other shapes reaches them through the
**input adapter** (`fa_rules.core.split.InputAdapter`), part of the model's first block: grey images are repeated to
three channels, and with `--model-opt image_size=N` images are resized (bilinear) to N x N first.
Without it the images keep their size: most designs end in an adaptive pooling and take 28 or 32 px
images as they are (ResNet-18 on 28 px reaches 1 x 1 after its last stage); a design that cannot is
refused when it is built, in one line saying to set `image_size`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fa_rules.core.errors import UserError, unknown_name_error
from fa_rules.core.network import ModelSpec
from fa_rules.core.split import AdaptedModule, InputAdapter
from fa_rules.plugins.manager import TORCHVISION_PREFIX as PREFIX

MAX_IMAGE_SIZE = 1024
PLAIN = (bool, int, float, str)


def classification_models() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def _plain_settings(builder) -> dict:
    """The model class's keyword settings with plain defaults (num_classes set from the dataset)."""
    with torch.device("meta"):  # allocates nothing: only the class is wanted
        model_class = type(builder(weights=None))
    return {p.name: p.default for p in inspect.signature(model_class.__init__).parameters.values()
            if p.name != "num_classes" and type(p.default) in PLAIN}


def torchvision_model_spec(name: str) -> ModelSpec:
    """The model spec of torchvision's classification model `name` (a one-line UserError for a
    name torchvision does not have)."""
    import torchvision.models

    known = classification_models()
    if name not in known:
        raise unknown_name_error("torchvision model", name, known)
    builder = torchvision.models.get_model_builder(name)
    options = {"image_size": 0, **_plain_settings(builder)}

    def build(in_shape, out_shape, heads=None, image_size: int = 0, **settings):
        if heads:
            raise UserError(f"model '{PREFIX}{name}' is a classifier and builds no heads ({', '.join(heads)})")
        if len(in_shape) != 3 or in_shape[0] not in (1, 3):
            raise UserError(f"model '{PREFIX}{name}' takes images of 1 or 3 channels, not inputs of shape "
                            f"{tuple(in_shape)}")
        if not 0 <= image_size <= MAX_IMAGE_SIZE:
            raise UserError(f"model '{PREFIX}{name}' needs image_size in 0..{MAX_IMAGE_SIZE} (0: as they are), "
                            f"got {image_size}")
        try:
            model = builder(weights=None, num_classes=int(out_shape[0]), **settings)
        except (TypeError, ValueError) as e:
            raise UserError(f"model '{PREFIX}{name}' cannot be built with {settings}: "
                            f"{(str(e).splitlines() or [''])[0]}") from None
        if in_shape[0] == 1 or image_size:
            model = AdaptedModule(InputAdapter(in_shape[0], image_size), model)
        if next(model.parameters()).device.type != "meta":
            _check_takes(model, in_shape, image_size)
        return model

    summary = f"torchvision's {name} (weights=None), images through the input adapter"
    return ModelSpec(PREFIX + name, build, summary, options, example_shape=(3, 32, 32))


def _check_takes(model: nn.Module, in_shape, image_size: int) -> None:
    """One forward on a zero batch: a design that cannot take these images says so now, in one line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *in_shape))
    except RuntimeError as e:
        size = f"{image_size} px" if image_size else f"{tuple(in_shape)} inputs"
        raise UserError(f"this torchvision design cannot take {size}: {(str(e).splitlines() or [''])[0][:160]}; "
                        "resize them with --model-opt image_size=224 (or another size it takes)") from None
    finally:
        model.train(was_training)
