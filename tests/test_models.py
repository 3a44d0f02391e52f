import pytest
import torch

from fa_rules import models as zoo
from fa_rules.core.errors import UserError


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_paper_networks_shapes(shape):
    x = torch.rand(2, *shape)
    assert zoo.paper_encoder(shape, (16,))(x).shape == (2, 16)
    assert zoo.paper_discriminator(shape, (1,))(x).shape == (2, 1)
    assert zoo.fa_generator(shape)(x).shape == (2, *shape)
    assert zoo.gan_generator((16,), shape)(torch.rand(2, 16)).shape == (2, *shape)


def test_paper_encoder_follows_table_7():
    net = zoo.paper_encoder((1, 28, 28), (10,))
    convs = [b.layer for b in net.blocks if isinstance(b.layer, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    assert net.blocks[4].layer.out_features == 4096 and net.blocks[5].layer.out_features == 10


def test_gan_generator_follows_table_12_at_64px():
    net = zoo.gan_generator((8,), (3, 64, 64))
    tconvs = [b.layer for b in net.blocks if isinstance(b.layer, torch.nn.ConvTranspose2d)]
    assert [(c.out_channels, c.stride[0]) for c in tconvs] == [
        (256, 2), (128, 1), (128, 2), (64, 1), (64, 2), (32, 1), (32, 2)
    ]
    assert net.blocks[0].layer.out_features == 4096


def test_paper_networks_refuse_other_sizes():
    with pytest.raises(UserError, match="28x28, 32x32 and 64x64"):
        zoo.paper_encoder((1, 8, 8), (10,))


def test_mlp_depth_width_activation():
    net = zoo.mlp((1, 8, 8), (10,), depth=3, width=7, activation="asinh")
    assert net.num_blocks == 4
    assert [b.layer.out_features for b in net.blocks] == [7, 7, 7, 10]
    with pytest.raises(UserError, match="unknown activation"):
        zoo.mlp((1, 8, 8), (10,), activation="tanhh")
