"""LeNet models of LeCun et al. (1998) as used by pruning papers: ``lenet_300_100`` and Caffe's ``lenet5_caffe``."""
from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import PrunekitError

from .common import check_image_shape, check_num_classes, check_shape, flat_size


class LeNet300100(nn.Module):
    """LeNet-300-100: flatten -> fc1 (784->300) -> ReLU -> fc2 (300->100) -> ReLU -> fc3 (100->classes).

    The first layer's width is the product of ``input_shape``; PyTorch default init.
    """

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.input_shape = check_shape(input_shape)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(flat_size(self.input_shape), 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5Caffe(nn.Module):
    """LeNet-5 of Caffe's MNIST example: conv1 (20, 5x5) -> pool -> conv2 (50, 5x5) -> pool -> fc1 (500) -> ReLU -> fc2.

    No ReLU after the convolutions, as in Caffe. On 1x28x28 the flattened features number 800. Other inputs work
    too: conv1 takes ``input_shape[0]`` channels and fc1's width follows the spatial size (at least 16x16).
    """

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.input_shape = check_image_shape("lenet5_caffe", input_shape)
        channels, height, width = self.input_shape
        h, w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if h < 1 or w < 1:
            raise PrunekitError(f"lenet5_caffe needs images of at least 16x16 pixels, got {height}x{width}")
        self.conv1 = nn.Conv2d(channels, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))
