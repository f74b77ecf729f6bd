"""VGG networks for 32x32 images (Simonyan & Zisserman 2015, adapted to CIFAR).

* :class:`VGG` follows open_lth's ``cifar_vgg_*``: conv3x3 (bias) -> BN -> ReLU per plan entry, four max-pools,
  AvgPool2d(2) on the remaining 2x2 map, then ``fc``; Kaiming-normal (fan-in) init.
* :class:`VGGKuangliu` follows kuangliu/pytorch-cifar's ``VGG('VGG19')``: five max-pools down to 1x1, then
  ``linear``; PyTorch default init.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from prunekit.errors import PrunekitError

from .common import check_image_shape, check_num_classes

Plan = Sequence[Union[int, str]]

PLANS: dict[int, list[Union[int, str]]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def make_features(plan: Plan, in_channels: int, inplace: bool = False) -> nn.Sequential:
    """Conv3x3(pad 1, bias) -> BatchNorm2d -> ReLU for each width in ``plan``; MaxPool2d(2) for each ``'M'``."""
    layers: list[nn.Module] = []
    for entry in plan:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(entry), 3, padding=1), nn.BatchNorm2d(int(entry)), nn.ReLU(inplace)]
            in_channels = int(entry)
    return nn.Sequential(*layers)


def check_halvings(model: str, input_shape: tuple[int, int, int], halvings: int) -> None:
    """Raise unless ``halvings`` floor-halvings take the image's height and width to exactly 1."""
    low, high = 2**halvings, 2 ** (halvings + 1) - 1
    _, height, width = input_shape
    if not (low <= height <= high and low <= width <= high):
        raise PrunekitError(f"{model} needs images of {low}..{high} pixels a side (e.g. 32x32), got {height}x{width}")


class VGG(nn.Module):
    """open_lth CIFAR VGG with batch norm: ``features`` (plan) -> ``pool`` AvgPool2d(2) -> flatten -> ``fc``."""

    def __init__(self, depth: int = 16, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)):
        super().__init__()
        if depth not in PLANS:
            raise PrunekitError(f"VGG depth must be one of {sorted(PLANS)}, got {depth!r}")
        name = f"vgg{depth}_bn"
        self.num_classes = check_num_classes(num_classes)
        self.input_shape = check_image_shape(name, input_shape)
        check_halvings(name, self.input_shape, PLANS[depth].count("M") + 1)
        self.features = make_features(PLANS[depth], self.input_shape[0])
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, self.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan-in, ReLU gain) conv/linear weights, zero biases, BN gamma 1 and beta 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class VGGKuangliu(nn.Module):
    """kuangliu/pytorch-cifar VGG-19: ``features`` (plan, trailing max-pool, AvgPool2d(1)) -> flatten -> ``linear``."""

    plan = PLANS[19] + ["M"]

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.input_shape = check_image_shape("vgg19_kuangliu", input_shape)
        check_halvings("vgg19_kuangliu", self.input_shape, self.plan.count("M"))
        self.features = make_features(self.plan, self.input_shape[0], inplace=True)
        self.features.append(nn.AvgPool2d(kernel_size=1, stride=1))
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(self.features(x)))
