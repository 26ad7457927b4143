"""The networks the benchmarks and experiments use, by name."""

from __future__ import annotations

import torch

SEGRESNET_FILTERS = {"segresnet-8": 8, "segresnet-16": 16, "segresnet-32": 32}


def segresnet(init_filters: int = 16) -> torch.nn.Module:
    """The seed's network: MONAI SegResNet for 3D spleen CT (1 channel in, background/spleen out)."""
    from monai.networks.nets import SegResNet

    return SegResNet(
        spatial_dims=3,
        init_filters=init_filters,
        in_channels=1,
        out_channels=2,
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
    )


def build_model(name: str) -> torch.nn.Module:
    """``segresnet-16`` and friends; the number is SegResNet's ``init_filters``."""
    if name not in SEGRESNET_FILTERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(SEGRESNET_FILTERS)}")
    return segresnet(SEGRESNET_FILTERS[name])
