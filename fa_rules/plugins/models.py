"""Built-in model zoo: MLPs, a LeNet-style CNN, CIFAR ResNets, a small VGG and the feature alignment paper's networks."""

from fa_rules import models as zoo
from fa_rules.core.hooks import hookimpl
from fa_rules.core.network import ModelSpec


@hookimpl
def register_models(register):
    register(ModelSpec("mlp", zoo.mlp, "fully connected: --depth hidden blocks of --width units",
                       {"depth": 2, "width": 256, "activation": "tanh"}))
    register(ModelSpec("lenet", zoo.lenet, "LeNet-5 style CNN: conv-pool-conv-pool-fc120-fc84",
                       {"activation": "relu"}))
    register(ModelSpec("biotorch_lenet", zoo.biotorch_lenet,
                       "BioTorch's LeNet: inputs resized to 32x32, three unpadded convs (6, 16, 120), fc84",
                       {"activation": "relu"}))
    register(ModelSpec("paper_encoder", zoo.paper_encoder,
                       "feature alignment encoder (appendix Tables 7-9; 28, 32 or 64 px)",
                       {"activation": "leaky_relu", "width_multiplier": 1.0}, example_shape=(1, 28, 28)))
    register(ModelSpec("paper_discriminator", zoo.paper_discriminator,
                       "least-squares GAN discriminator (appendix Table 10)",
                       {"activation": "leaky_relu", "width_multiplier": 1.0}, example_shape=(1, 28, 28)))
    register(ModelSpec("fa_generator", zoo.fa_generator,
                       "image refinement generator for VFA-GAN (appendix Table 11)",
                       {"activation": "leaky_relu", "batch_norm": True, "width_multiplier": 1.0}, example_shape=(1, 28, 28)))
    register(ModelSpec("gan_generator", zoo.gan_generator,
                       "latent-to-image generator for GAN / VAE baselines (appendix Table 12)",
                       {"activation": "leaky_relu", "batch_norm": True, "width_multiplier": 1.0}, example_shape=(1, 28, 28)))
    register(ModelSpec("resnet", zoo.resnet, "He et al. 2016 CIFAR ResNet, --depth 6n+2 (8, 20, 32, 56...); "
                       "shortcut A (zero-padding) or B (1x1 projection)",
                       {"depth": 20, "width": 16, "shortcut": "A", "running_stats": False}, example_shape=(3, 32, 32)))
    for depth in (20, 32, 56):
        register(ModelSpec(f"resnet{depth}", zoo.resnet_of_depth(depth),
                           f"He et al. 2016 CIFAR ResNet-{depth}; shortcut A (zero-padding) or B (1x1 projection)",
                           {"width": 16, "shortcut": "A", "running_stats": False}, example_shape=(3, 32, 32)))
    register(ModelSpec("vgg", zoo.vgg, "small VGG-style CNN: 3 stages of two 3x3 convs (batch norm), max pooling",
                       {"width": 32, "activation": "relu", "batch_norm": True, "running_stats": False,
                        "convs_per_stage": 2}))
    register(ModelSpec("simple_vgg", zoo.simple_vgg, "Ernoult et al. 2022's SimpleVGG: five 3x3 conv-ELU-maxpool "
                       "blocks (128, 128, 256, 256, 512 channels), Linear out", {"activation": "elu",
                       "width_multiplier": 1.0}, example_shape=(3, 32, 32)))
