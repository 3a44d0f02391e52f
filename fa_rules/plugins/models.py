"""Built-in model zoo: MLPs, a LeNet-style CNN and the feature alignment paper's networks."""

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
