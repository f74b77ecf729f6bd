"""Model definitions and a registry by name.

>>> model = get_model("resnet20", num_classes=10)
>>> model.input_shape
(3, 32, 32)
"""
from .lenet import LeNet5Caffe, LeNet300100
from .mlp import MLPNet, SynflowMLP
from .registry import ModelInfo, canonical_name, get_model, model_info, model_names
from .resnet import BasicBlock, CifarResNet, ResNet18
from .vgg import VGG, VGGKuangliu

__all__ = [
    "ModelInfo", "get_model", "model_names", "model_info", "canonical_name",
    "LeNet300100", "LeNet5Caffe", "MLPNet", "SynflowMLP", "VGG", "VGGKuangliu", "ResNet18", "CifarResNet",
    "BasicBlock",
]
