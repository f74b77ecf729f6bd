"""Model helpers shared by the structured-pruning tests."""
import torch
from torch import nn


@torch.no_grad()
def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm2d statistics and affine parameters (a forgotten BN slice or shift then shows up)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model
