"""Feature extractor (paper Sec. 3.1): torchvision ResNet + FPN with levels P2..P6.

The ResNet is always built with `weights=None` (no hub downloads); pretrained weights come
from a local torchvision ResNet state_dict file (`ModelConfig.pretrained_path`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

RESNETS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}


class PretrainedWeightsError(RuntimeError):
    """The pretrained ResNet file is missing, unreadable or does not fit the architecture."""


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"model.norm: unknown backbone norm {norm!r}; use frozen_bn, bn or gn")


def load_pretrained_resnet(net: resnet.ResNet, path: str | Path) -> None:
    """Load a local torchvision ResNet state_dict (`torch.load(weights_only=True)`) into `net`."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: pretrained backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise PretrainedWeightsError(f"{path}: cannot read pretrained weights: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path}: expected a ResNet state_dict, got {type(state)}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PretrainedWeightsError(
            f"{path}: weights do not match the configured backbone: {e}"
        ) from e


class Backbone(nn.Module):
    """ResNet + FPN returning the five levels P2..P6 (strides 4, 8, 16, 32, 64).

    Args:
        name: resnet18 | resnet34 | resnet50 | resnet101.
        out_channels: FPN width.
        norm: backbone normalisation, frozen_bn | bn | gn.
        trainable_layers: number of trainable ResNet stages counted from the top (0..5).
        pretrained_path: optional local torchvision ResNet state_dict.

    `size_divisibility` is 32 (the stride of C5): inputs padded to a multiple of 32 give
    P2..P5 exactly H/4..H/32, and P6 (a stride-2 subsample of P5) has ceil(H/64) cells
    whose centres still coincide with every other P5 cell, so padding to 64 is not needed.
    """

    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    size_divisibility: int = 32

    def __init__(
        self,
        name: str = "resnet50",
        out_channels: int = 256,
        norm: str = "frozen_bn",
        trainable_layers: int = 5,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"model.backbone: unknown {name!r}; choose from {sorted(RESNETS)}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"model.trainable_layers must be in 0..5, got {trainable_layers}")
        net = RESNETS[name](weights=None, norm_layer=_norm_layer(norm))
        if pretrained_path:
            load_pretrained_resnet(net, pretrained_path)
        layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            layers_to_train.append("bn1")
        for param_name, param in net.named_parameters():
            if not any(param_name.startswith(layer) for layer in layers_to_train):
                param.requires_grad_(False)
        c2_channels = net.inplanes // 8  # 64 for resnet18/34, 256 for resnet50/101
        self.fpn = BackboneWithFPN(
            net,
            return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
            in_channels_list=[c2_channels * 2**i for i in range(4)],
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> list[Tensor]:
        """images: B x 3 x H x W (H, W multiples of 32) -> [P2..P6], each B x C x H/s x W/s."""
        return list(self.fpn(images).values())
