"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant for mobile: ReLU6, no squeeze-and-excitation, stem and
head not scaled) with prunekit's own module names, and loading of its ImageNet-1k weights.

Architecture (width and depth multipliers 1.0, 224x224 inputs, 4,652,008 parameters with 1000 classes)::

    stem_pad -> stem (3x3 conv, stride 2, 32) -> stem_bn -> ReLU6
    blocks.0 .. blocks.15: MBConv blocks in 7 stages of (expand ratio, kernel, stride of the first block,
        output channels, repeats) = (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3)
        (6,5,2,192,4) (6,3,1,320,1)
    head (1x1 conv 320 -> 1280) -> head_bn -> ReLU6 -> pool (global average) -> dropout (0.2) -> fc

An :class:`MBConv` block is ``expand`` (1x1 conv to ``in * ratio`` channels) -> ``expand_bn`` -> ReLU6 (both absent
when the ratio is 1) -> ``pad`` -> ``depthwise`` (k x k, stride s, ``groups`` = channels) -> ``depthwise_bn`` ->
ReLU6 -> ``project`` (1x1 conv, linear bottleneck) -> ``project_bn``, plus the block's input when the stride is 1
and the channel counts agree. There is no drop-connect (stochastic depth): it would only act in training and
makes no difference to a pruning method, so leaving it out keeps every forward a plain function of the weights.
Registration order equals execution order, so layer lists read in network order.

Padding. The weights were trained in TensorFlow with ``"SAME"`` padding, which for a stride-2 convolution on an
even input size pads one pixel less on the top/left than on the bottom/right. By default (``padding="same"``)
each stride-2 convolution is preceded by an ``nn.ZeroPad2d`` holding TensorFlow's pads for the model's
``input_shape`` (computed once, at construction; an input of another size still runs, with those pads), and every
convolution is a plain ``nn.Conv2d`` with ``padding=0`` (stride 2) or ``k // 2`` (stride 1, where SAME is
symmetric), so structured pruning and FLOP counting see ordinary layers. ``padding="symmetric"`` pads ``k // 2``
on every side everywhere (PyTorch's convention; ``pad`` is then ``nn.Identity``); the ImageNet weights classify the
sample photos correctly either way, but only ``"same"`` is the function they were trained as.

Batch norm. All BatchNorm layers use ``eps=1e-3`` (the value the weights were trained with). Their ``momentum``
defaults to 0.1 (:data:`BN_MOMENTUM`, PyTorch's default) rather than the 0.01 of the original training
(:data:`TF_BN_MOMENTUM`, TensorFlow's decay 0.99): after pruning, the running statistics must follow the changed
activations within the few hundred steps of a fine-tuning run, and with momentum 0.01 they lag far behind
(issue 16 measured on this model: 100 fine-tuning steps after pruning reached 0.49 accuracy with momentum 0.01
against 0.84 with 0.1; again here on Fashion-MNIST at 64x64, every conv 50% magnitude-pruned, new head, 100 SGD
steps of batch 32: eval-mode test accuracy 0.17 with 0.01 against 0.74 with 0.1, while with batch statistics both
give 0.75 -- the trained weights are the same, only the running statistics lag). Pass ``bn_momentum=TF_BN_MOMENTUM`` (or call :func:`set_bn_momentum`) to keep the
original behaviour; recomputing the statistics on training batches is the other remedy.

Inputs. The ImageNet weights expect RGB images scaled to [0, 1] and normalized per channel as
``(x - 127/255) / (128/255)`` (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`; TensorFlow Lite's
``(pixel - 127) / 128``), 224x224. :func:`prepare_image` does that for one uint8 image.

Weights. :func:`load_efficientnet_lite0_imagenet` copies the state_dict fetched by ``prunekit models fetch
efficientnet_lite0`` (keys as in lukemelas' EfficientNet-PyTorch: ``_conv_stem.weight``, ``_blocks.3._bn1.bias``,
..., ``_fc.weight``; :func:`lukemelas_to_prunekit` renames them) into a model built here. The mapping is strict:
every tensor of the file must land on a tensor of the model with the same shape and every tensor of the model must
be written, except the classifier ``fc`` when the model has other than 1000 classes (it then keeps its fresh,
seeded initialisation and its names are returned).
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from prunekit.errors import PrunekitError

from .common import check_image_shape, check_num_classes

__all__ = [
    "EfficientNetLite0", "MBConv", "BN_MOMENTUM", "TF_BN_MOMENTUM", "BN_EPS", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGENET_CLASSES", "STAGES", "lukemelas_to_prunekit", "load_efficientnet_lite0_imagenet", "prepare_image",
    "set_bn_momentum",
]

#: BatchNorm momentum of prunekit's definition (PyTorch's default; see the module docstring for why not 0.01)
BN_MOMENTUM = 0.1
#: BatchNorm momentum the ImageNet weights were trained with (TensorFlow decay 0.99)
TF_BN_MOMENTUM = 0.01
#: BatchNorm epsilon the ImageNet weights were trained with
BN_EPS = 1e-3
#: per-channel mean and std of the normalization the ImageNet weights expect, for inputs in [0, 1]
IMAGENET_MEAN = (127 / 255,) * 3
IMAGENET_STD = (128 / 255,) * 3
IMAGENET_CLASSES = 1000

#: (expand ratio, kernel size, stride of the first block, output channels, repeats) of the seven stages of Lite0
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
PADDINGS = ("same", "symmetric")


def _same_pads(size: tuple[int, int], kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" pads (left, right, top, bottom) of a ``kernel`` conv with ``stride`` on ``size`` (H, W):
    the output is ``ceil(n / stride)`` and the extra pixel of an odd total goes to the bottom/right."""
    out = []
    for n in (size[1], size[0]):  # ZeroPad2d takes width pads first
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        out += [total // 2, total - total // 2]
    return tuple(out)  # type: ignore[return-value]


def _conv_and_pad(cin: int, cout: int, kernel: int, stride: int, groups: int, size: tuple[int, int],
                  padding: str) -> tuple[nn.Module, nn.Conv2d]:
    """An explicit pad module (``ZeroPad2d`` or ``Identity``) and a bias-free conv that together pad as asked."""
    if padding == "same" and stride > 1:
        pads = _same_pads(size, kernel, stride)
        pad: nn.Module = nn.ZeroPad2d(pads) if any(pads) else nn.Identity()
        return pad, nn.Conv2d(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)
    # stride 1 with an odd kernel: SAME is symmetric; "symmetric" pads k // 2 everywhere
    return nn.Identity(), nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=momentum)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (see the module docstring); ``size`` is the (H, W)
    of the block's input for the model's ``input_shape`` (it fixes the SAME pads of a stride-2 depthwise conv)."""

    def __init__(self, cin: int, cout: int, expand_ratio: int, kernel: int, stride: int, size: tuple[int, int],
                 bn_momentum: float = BN_MOMENTUM, padding: str = "same"):
        super().__init__()
        mid = cin * expand_ratio
        self.expand = nn.Conv2d(cin, mid, 1, bias=False) if expand_ratio != 1 else None
        self.expand_bn = _bn(mid, bn_momentum) if expand_ratio != 1 else None
        self.pad, self.depthwise = _conv_and_pad(mid, mid, kernel, stride, mid, size, padding)
        self.depthwise_bn = _bn(mid, bn_momentum)
        self.project = nn.Conv2d(mid, cout, 1, bias=False)
        self.project_bn = _bn(cout, bn_momentum)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand is not None:
            out = self.act(self.expand_bn(self.expand(out)))
        out = self.act(self.depthwise_bn(self.depthwise(self.pad(out))))
        out = self.project_bn(self.project(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for ``input_shape`` (C, H, W) images and ``num_classes`` outputs (module docstring).

    ``bn_momentum``: momentum of every BatchNorm (default :data:`BN_MOMENTUM` = 0.1; :data:`TF_BN_MOMENTUM` = 0.01
    is the original training's). ``padding``: ``"same"`` (TensorFlow's, what the ImageNet weights were trained
    with) or ``"symmetric"``. ``dropout``: before ``fc`` (0.2 as trained). Fresh initialisation as in torchvision's
    EfficientNet: Kaiming-normal (fan-out) convs, BatchNorm weight 1 and bias 0, ``fc`` uniform in
    ``±1/sqrt(num_classes)`` with bias 0; it uses torch's global RNG, so ``torch.manual_seed`` makes it
    reproducible.
    """

    def __init__(self, num_classes: int = IMAGENET_CLASSES, input_shape: Sequence[int] = (3, 224, 224),
                 dropout: float = 0.2, bn_momentum: float = BN_MOMENTUM, padding: str = "same"):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.input_shape = check_image_shape("efficientnet_lite0", input_shape)
        if padding not in PADDINGS:
            raise PrunekitError(f"efficientnet_lite0 padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float)) or not 0 < bn_momentum <= 1:
            raise PrunekitError(f"bn_momentum must be a number in (0, 1], got {bn_momentum!r} (0.1 is PyTorch's "
                                f"default, {TF_BN_MOMENTUM} the original training's)")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise PrunekitError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.padding = padding
        size = self.input_shape[1:]
        self.stem_pad, self.stem = _conv_and_pad(self.input_shape[0], STEM_CHANNELS, 3, 2, 1, size, padding)
        self.stem_bn = _bn(STEM_CHANNELS, bn_momentum)
        size = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
        blocks, cin = [], STEM_CHANNELS
        for ratio, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConv(cin, cout, ratio, kernel, s, size, bn_momentum, padding))
                size, cin = (math.ceil(size[0] / s), math.ceil(size[1] / s)), cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(cin, HEAD_CHANNELS, 1, bias=False)
        self.head_bn = _bn(HEAD_CHANNELS, bn_momentum)
        self.act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(HEAD_CHANNELS, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        reset_head(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem_bn(self.stem(self.stem_pad(x))))
        x = self.blocks(x)
        x = self.act(self.head_bn(self.head(x)))
        return self.fc(self.dropout(self.flatten(self.pool(x))))


def reset_head(model: EfficientNetLite0) -> None:
    """Fresh ``fc`` weights: uniform in ``±1/sqrt(out_features)`` (torch's global RNG), bias 0."""
    bound = 1 / math.sqrt(model.fc.out_features)
    nn.init.uniform_(model.fc.weight, -bound, bound)
    nn.init.zeros_(model.fc.bias)


def set_bn_momentum(model: nn.Module, momentum: Optional[float]) -> int:
    """Set the ``momentum`` of every BatchNorm of ``model`` (None: cumulative average); returns how many."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = momentum
    return len(bns)


# ---------------------------------------------------------------------------------------------------------------
# the ImageNet weights: lukemelas' names -> prunekit's

_TOP = {"_conv_stem": "stem", "_bn0": "stem_bn", "_conv_head": "head", "_bn1": "head_bn", "_fc": "fc"}
_BLOCK = {"_expand_conv": "expand", "_bn0": "expand_bn", "_depthwise_conv": "depthwise", "_bn1": "depthwise_bn",
          "_project_conv": "project", "_bn2": "project_bn"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_\w+)\.(\w+)")
_TOP_KEY = re.compile(r"(_\w+)\.(\w+)")


def lukemelas_to_prunekit(key: str) -> str:
    """The name in :class:`EfficientNetLite0` of the lukemelas EfficientNet-PyTorch state_dict key ``key``
    (``_blocks.3._bn1.running_var`` -> ``blocks.3.depthwise_bn.running_var``); unknown keys raise
    :class:`PrunekitError`."""
    m = _BLOCK_KEY.fullmatch(key)
    if m and m.group(2) in _BLOCK:
        return f"blocks.{int(m.group(1))}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    m = _TOP_KEY.fullmatch(key)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    raise PrunekitError(f"{key!r} is not a key of an EfficientNet-Lite state_dict in lukemelas' naming "
                        f"(_conv_stem.*, _bn0.*, _blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/"
                        f"_bn2.*, _conv_head.*, _bn1.*, _fc.*): pass the file `prunekit models fetch "
                        f"efficientnet_lite0` gives")


def load_efficientnet_lite0_imagenet(model: EfficientNetLite0, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                                     root=None) -> list[str]:
    """Copy the ImageNet-1k weights into ``model`` (in place) and return the names of its state entries left as
    they were (``["fc.weight", "fc.bias"]`` when ``model.num_classes != 1000``, else ``[]``).

    ``state_dict``: the weights in lukemelas' naming; by default the file fetched by ``prunekit models fetch
    efficientnet_lite0`` into the data directory ``root`` (a :class:`~prunekit.errors.DatasetMissingError` naming
    that command when it is missing). Strict: a key that does not map onto the model, a missing tensor or a shape
    that differs raises :class:`PrunekitError` and leaves ``model`` unchanged. A pruned model (masks applied as
    zeros) loads like any other; a physically shrunk one does not (its shapes differ).
    """
    if not isinstance(model, EfficientNetLite0):
        raise PrunekitError(f"the efficientnet_lite0 ImageNet weights load into the model "
                            f"get_model('efficientnet_lite0') builds, not into a {type(model).__name__}")
    if state_dict is None:
        from .fetch import efficientnet_lite0_state_dict
        state_dict = efficientnet_lite0_state_dict(root)
    if model.input_shape[0] != 3:
        raise PrunekitError(f"the efficientnet_lite0 ImageNet weights need 3 input channels (RGB), the model has "
                            f"input_shape {model.input_shape}: build it with input_shape (3, H, W)")
    skip_head = model.num_classes != IMAGENET_CLASSES
    target = model.state_dict()
    values: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = lukemelas_to_prunekit(key)
        if skip_head and name.startswith("fc."):
            continue
        if name not in target:
            raise PrunekitError(f"weights key {key!r} maps to {name!r}, which the model does not have: the file is "
                                f"not EfficientNet-Lite0 (fetch it again with `prunekit models fetch "
                                f"efficientnet_lite0 --force`)")
        if name in values:
            raise PrunekitError(f"weights key {key!r} maps to {name!r} a second time: the state_dict is malformed")
        if tuple(value.shape) != tuple(target[name].shape):
            raise PrunekitError(f"weights key {key!r} has shape {tuple(value.shape)} but the model's {name!r} has "
                                f"{tuple(target[name].shape)}: load into an unpruned, unshrunk "
                                f"get_model('efficientnet_lite0') with input_shape (3, H, W)")
        values[name] = value
    left = [n for n in target if n not in values]
    missing = [n for n in left if not (skip_head and n.startswith("fc."))]
    if missing:
        raise PrunekitError(f"the weights have no tensor for {len(missing)} entries of the model (first: "
                            f"{missing[0]!r}): the file is not EfficientNet-Lite0 (fetch it again with `prunekit "
                            f"models fetch efficientnet_lite0 --force`)")
    with torch.no_grad():
        for name, value in values.items():
            target[name].copy_(value)
    return left


def prepare_image(image: torch.Tensor, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """One uint8 image (3, H, W) as the ImageNet weights expect it: the central square crop, resized to ``size``
    x ``size`` (bilinear, antialiased), scaled to [0, 1] and normalized ``(x - mean) / std`` per channel;
    returns float32 (3, size, size)."""
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise PrunekitError(f"prepare_image takes a uint8 RGB image of shape (3, H, W), got {image.dtype} "
                            f"{tuple(image.shape)}")
    h, w = image.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[:, top:top + side, left:left + side].float().div(255).unsqueeze(0)
    x = nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s)[0]
