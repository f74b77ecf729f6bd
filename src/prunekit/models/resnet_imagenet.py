"""ResNet-50 for ImageNet (He et al. 2016), with torchvision's architecture and parameter names.

conv1 7x7 stride 2 -> bn1 -> relu -> maxpool 3x3 stride 2 -> layer1..layer4 of :class:`Bottleneck` blocks
([3, 4, 6, 3], expansion 4, stride on the 3x3 conv as in torchvision's "ResNet V1.5") -> adaptive avgpool -> ``fc``.
State dicts are interchangeable with ``torchvision.models.resnet50`` (25,557,032 parameters for 1000 classes).
Initialisation as torchvision: Kaiming-normal (fan-out, ReLU) convs, BN gamma 1 and beta 0, PyTorch's default
Linear init for ``fc``. The adaptive pool makes any input of at least 32x32 work.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import check_image_shape, check_num_classes


class Bottleneck(nn.Module):
    """conv1 1x1 -> bn1 -> conv2 3x3 (stride s) -> bn2 -> conv3 1x1 (planes * 4) -> bn3, ReLU after bn1/bn2 and after
    the sum with the shortcut; ``downsample`` (Conv1x1 stride s + BN) when the stride or width changes, else None."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
                           if stride != 1 or in_planes != out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # the shortcut runs after the main path, so forward order equals registration order (torchvision's names)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """ImageNet ResNet of Bottleneck blocks; ``layers=(3, 4, 6, 3)`` is ResNet-50."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000,
                 input_shape: tuple[int, ...] = (3, 224, 224)):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.input_shape = check_image_shape("resnet50", input_shape)
        self.conv1 = nn.Conv2d(self.input_shape[0], 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, self.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's init: Kaiming-normal (fan-out, ReLU) convs, BN gamma 1 / beta 0; ``fc`` keeps the default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def ResNet50(num_classes: int = 1000, input_shape: tuple[int, ...] = (3, 224, 224)) -> ImageNetResNet:
    return ImageNetResNet((3, 4, 6, 3), num_classes=num_classes, input_shape=input_shape)
