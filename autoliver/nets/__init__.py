"""Segmentation networks built from a plan configuration, by family name.

    from autoliver.nets import build_network, net_spec
    model = build_network("unet", net_spec(plans.configurations["3d_fullres"]))

Importing this package registers the built-in families ("unet", "resenc").
"""

from autoliver.nets import resenc as _resenc  # noqa: F401  (registers "resenc")
from autoliver.nets import unet as _unet  # noqa: F401  (registers "unet")
from autoliver.nets.registry import DEFAULT_ARCH, NetSpec, available_networks, build_network, net_spec, register_network
from autoliver.nets.resenc import ResEncUNet, default_blocks_per_stage
from autoliver.nets.unet import UNet

__all__ = [
    "DEFAULT_ARCH",
    "NetSpec",
    "ResEncUNet",
    "UNet",
    "available_networks",
    "build_network",
    "default_blocks_per_stage",
    "net_spec",
    "register_network",
]
