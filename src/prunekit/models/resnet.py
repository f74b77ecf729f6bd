"""Residual networks for 32x32 images (He et al. 2016).

* :class:`ResNet18` follows kuangliu/pytorch-cifar's ``ResNet18``: 3x3 stem, no max-pool, four stages of two
  blocks (64..512 wide), ``linear`` head; PyTorch default init.
* :class:`CifarResNet` is the CIFAR ResNet-D of He et al. section 4.2 as in open_lth's ``cifar_resnet_D``: three
  stages of (D-2)/6 blocks (16, 32, 64 wide), 1x1-conv + BN projection shortcuts where the shape changes
  (option B), ``fc`` head; Kaiming-normal init with fan-in (as open_lth does), BN gamma 1 and beta 0.
"""
from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import PrunekitError

from .common import check_image_shape, check_num_classes


class BasicBlock(nn.Module):
    """conv1 3x3 (stride s) -> bn1 -> relu1 -> conv2 3x3 -> bn2, plus ``shortcut``, then relu2.

    ``shortcut`` is Conv1x1 (stride s) + BN when the stride or width changes, else an empty (identity) Sequential.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        projection = stride != 1 or in_planes != planes
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
            if projection
            else nn.Sequential()
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks; only the first has stride ``stride``."""
    strides = [stride] + [1] * (blocks - 1)
    layers = []
    for s in strides:
        layers.append(BasicBlock(in_planes, planes, s))
        in_planes = planes
    return nn.Sequential(*layers)


class ResNet18(nn.Module):
    """kuangliu ResNet-18: conv1 -> bn1 -> relu -> layer1..layer4 -> global avg pool -> ``linear``."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.input_shape = check_image_shape("resnet18", input_shape)
        self.conv1 = nn.Conv2d(self.input_shape[0], 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = make_stage(64, 64, 2, 1)
        self.layer2 = make_stage(64, 128, 2, 2)
        self.layer3 = make_stage(128, 256, 2, 2)
        self.layer4 = make_stage(256, 512, 2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)  # kuangliu's avg_pool2d(4) on 32x32 input; works for any size
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.flatten(self.pool(x)))


class CifarResNet(nn.Module):
    """CIFAR ResNet-``depth``: conv -> bn -> relu -> layer1..layer3 -> global avg pool -> ``fc``."""

    def __init__(self, depth: int = 20, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise PrunekitError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth!r}")
        blocks = (depth - 2) // 6
        self.depth = depth
        self.num_classes = check_num_classes(num_classes)
        self.input_shape = check_image_shape(f"resnet{depth}", input_shape)
        self.conv = nn.Conv2d(self.input_shape[0], 16, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = make_stage(16, 16, blocks, 1)
        self.layer2 = make_stage(16, 32, blocks, 2)
        self.layer3 = make_stage(32, 64, blocks, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, self.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan-in, ReLU gain) conv/linear weights, zero fc bias, BN gamma 1 and beta 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))
