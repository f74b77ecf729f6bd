"""Op tables of the channel analysis (:mod:`prunekit.structured.channel_analysis`): which modules are norms, which
modules, functions and tensor methods pass channels through (element-wise, or channel-wise on the spatial dims
only), combine tensors element-wise (and so tie their channels), reshape, reduce, normalise (softmax) or only
query metadata.
"""
from __future__ import annotations

from torch import nn

_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
#: element-wise modules: any features-per-channel block passes through
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Threshold, nn.Identity, nn.Dropout, nn.AlphaDropout, nn.Hardshrink, nn.Softshrink,
)
#: channel-wise modules that work on the spatial dims of each channel separately (need block 1)
_CHANNELWISE_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)
_ELEMENTWISE_NAMES = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu", "silu", "mish",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardsigmoid", "hardtanh", "hardtanh_", "softplus",
    "softsign", "logsigmoid", "threshold", "dropout", "alpha_dropout", "feature_alpha_dropout", "clamp", "clamp_",
    "clip", "clamp_min", "clamp_max", "abs", "abs_", "neg", "neg_", "exp", "log", "sqrt", "rsqrt", "square",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as", "requires_grad_",
    "sign", "floor", "ceil", "round", "reciprocal", "sin", "cos", "erf", "hardshrink", "softshrink", "tanhshrink",
    "nan_to_num", "cpu", "cuda", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
}
_CHANNELWISE_NAMES = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear", "dropout1d", "dropout2d", "dropout3d",
}
_BINARY_NAMES = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "iadd", "isub", "imul",
                 "itruediv", "maximum", "minimum", "fmax", "fmin", "pow", "pow_", "true_divide", "multiply",
                 "subtract", "rsub", "radd", "rmul", "rtruediv"}
_DIVISION = {"div", "div_", "truediv", "itruediv", "true_divide", "rtruediv", "pow", "pow_"}
_RESHAPE_NAMES = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_"}
_REDUCE_NAMES = {"mean", "sum", "amax", "amin", "nansum", "nanmean"}
_META_NAMES = {"size", "dim", "numel", "ndimension", "nelement", "type", "is_contiguous", "get_device"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_SOFTMAX_NAMES = {"softmax", "log_softmax", "softmin"}
