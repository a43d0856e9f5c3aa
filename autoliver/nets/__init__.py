"""Segmentation networks built from a plan configuration, by family name.

    from autoliver.nets import build_network, net_spec
    model = build_network("unet", net_spec(plans.configurations["3d_fullres"]))

Importing this package registers the built-in families: the planned U-Nets ("unet",
"resenc") and the fixed-topology published networks ("dualpath3d", "segnet_vgg16",
"resunet2d", "mixpool_unet2d", "unet2d_classic", "resnet50_unet", "vgg16_unet", "fcn_r50",
"deeplabv3plus_r101"; widths and other options from ``NetSpec.options``).
``input_divisor(arch, spec)`` is what input sizes must be multiples of;
``estimate_network(arch, spec, patch)`` sizes a network without building it;
``load_encoder_weights(model, path)`` loads pretrained encoder weights.
"""

from autoliver.nets import deeplab as _deeplab  # noqa: F401  (registers "deeplabv3plus_r101")
from autoliver.nets import dualpath as _dualpath  # noqa: F401  (registers "dualpath3d")
from autoliver.nets import encoder_unets as _encoder_unets  # noqa: F401  (registers "resnet50_unet", "vgg16_unet")
from autoliver.nets import fcn as _fcn  # noqa: F401  (registers "fcn_r50")
from autoliver.nets import resenc as _resenc  # noqa: F401  (registers "resenc")
from autoliver.nets import resunet as _resunet  # noqa: F401  (registers "resunet2d")
from autoliver.nets import segnet as _segnet  # noqa: F401  (registers "segnet_vgg16")
from autoliver.nets import unet as _unet  # noqa: F401  (registers "unet")
from autoliver.nets import unet2d as _unet2d  # noqa: F401  (registers "unet2d_classic", "mixpool_unet2d")
from autoliver.nets.registry import (
    DEFAULT_ARCH,
    NetEstimate,
    NetSpec,
    available_networks,
    build_network,
    estimate_network,
    fixed_spec,
    input_divisor,
    net_spec,
    register_network,
)
from autoliver.nets.resenc import ResEncUNet, default_blocks_per_stage
from autoliver.nets.unet import UNet
from autoliver.nets.weights import load_encoder_weights

__all__ = [
    "DEFAULT_ARCH",
    "NetEstimate",
    "NetSpec",
    "ResEncUNet",
    "UNet",
    "available_networks",
    "build_network",
    "default_blocks_per_stage",
    "estimate_network",
    "fixed_spec",
    "input_divisor",
    "load_encoder_weights",
    "net_spec",
    "register_network",
]
