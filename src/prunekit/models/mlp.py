"""Plain multilayer perceptrons: ``mlpnet`` and ``synflow_mlp``.

Both flatten their input, so the first layer's width is the product of ``input_shape`` (784 for MNIST).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import check_num_classes, check_shape, flat_size


class MLPNet(nn.Module):
    """784-40-20-10 ReLU MLP without biases; returns log-probabilities (``log_softmax`` of the logits).

    The small MNIST "MLPNet" of second-order pruning benchmarks (WoodFisher, Singh & Alistarh 2020, and
    successors). Because the output is already log-probabilities, cross-entropy on it equals NLL.
    """

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.input_shape = check_shape(input_shape)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(flat_size(self.input_shape), 40, bias=False)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(40, 20, bias=False)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(20, self.num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


class SynflowMLP(nn.Module):
    """Fully connected net of SynFlow (Tanaka et al. 2020, model ``fc``): 784-100-100-100-100-100-10, ReLU.

    Six linear layers ``fc1`` .. ``fc6``, each but the last followed by ``relu1`` .. ``relu5``; PyTorch default init.
    """

    width = 100
    depth = 6

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.input_shape = check_shape(input_shape)
        self.flatten = nn.Flatten()
        widths = [flat_size(self.input_shape)] + [self.width] * (self.depth - 1) + [self.num_classes]
        for i in range(self.depth):
            self.add_module(f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))
            if i < self.depth - 1:
                self.add_module(f"relu{i + 1}", nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for module in list(self.children())[1:]:
            x = module(x)
        return x
