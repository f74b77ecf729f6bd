"""Tests for prunekit.models: exact sizes, shapes, names, aliases, errors, init and module order."""
import dataclasses

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models import ModelInfo, canonical_name, get_model, model_info, model_names

# name: (conv weights, linear weights, parameters with 10 classes, parameters with 100 classes or None)
SIZES = {
    "lenet_300_100": (0, 266_200, 266_610, None),
    "lenet5_caffe": (25_500, 405_000, 431_080, None),
    "mlpnet": (0, 32_360, 32_360, None),
    "synflow_mlp": (0, 119_400, 119_910, None),
    "vgg11_bn": (9_217_728, 5_120, 9_231_114, None),
    "vgg13_bn": (9_402_048, 5_120, 9_416_010, None),
    "vgg16_bn": (14_710_464, 5_120, 14_728_266, 14_774_436),
    "vgg19_bn": (20_018_880, 5_120, 20_040_522, 20_086_692),
    "vgg19_kuangliu": (20_018_880, 5_120, 20_040_522, 20_086_692),
    "resnet18": (11_159_232, 5_120, 11_173_962, 11_220_132),
    "resnet20": (270_256, 640, 272_474, None),
    "resnet32": (463_792, 640, 466_906, None),
    "resnet44": (657_328, 640, 661_338, None),
    "resnet56": (850_864, 640, 855_770, None),
    "resnet50": (23_454_912, 20_480, 23_528_522, 23_712_932),
    "resnet110": (1_721_776, 640, 1_730_714, None),
    "efficientnet_lite0": (3_328_992, 12_800, 3_383_818, 3_499_108),
}

_CACHE: dict = {}


def built(name):
    """One shared default instance per model (tests that use it do not modify it)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = get_model(name)
    return _CACHE[name]


def weights(model, kind):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, kind))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model():
    assert sorted(model_names()) == sorted(SIZES)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes(name):
    conv, linear, params10, params100 = SIZES[name]
    model = built(name)
    assert weights(model, nn.Conv2d) == conv
    assert weights(model, nn.Linear) == linear
    assert n_params(model) == params10
    if params100 is not None:
        assert n_params(get_model(name, num_classes=100)) == params100


def test_layer_counts():
    assert sum(isinstance(m, nn.Linear) for m in built("synflow_mlp").modules()) == 6
    assert sum(isinstance(m, nn.Conv2d) for m in built("vgg19_kuangliu").modules()) == 16
    assert sum(isinstance(m, nn.Conv2d) for m in built("vgg16_bn").modules()) == 13


@pytest.mark.parametrize("name", sorted(SIZES))
def test_forward_shape_and_attributes(name):
    model = built(name)
    info = model_info(name)
    assert model.input_shape == info.default_input_shape
    assert model.num_classes == 10
    with torch.no_grad():
        out = model(torch.randn(2, *model.input_shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SIZES))
def test_registration_order_is_forward_order(name):
    model = built(name)
    registered = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    executed = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: executed.append(mod)) for m in registered]
    try:
        with torch.no_grad():
            model(torch.randn(2, *model.input_shape))
    finally:
        for h in hooks:
            h.remove()
    assert [id(m) for m in executed] == [id(m) for m in registered]


def test_submodule_names():
    names = {
        "lenet_300_100": ["fc1", "fc2", "fc3"],
        "lenet5_caffe": ["conv1", "conv2", "fc1", "fc2"],
        "mlpnet": ["fc1", "fc2", "fc3"],
        "synflow_mlp": [f"fc{i}" for i in range(1, 7)],
        "vgg16_bn": ["fc"],
        "vgg19_kuangliu": ["linear"],
        "resnet18": ["conv1", "layer2.0.shortcut.0", "linear"],
        "resnet20": ["conv", "layer2.0.shortcut.0", "fc"],
    }
    for model_name, expected in names.items():
        modules = dict(built(model_name).named_modules())
        for sub in expected:
            assert isinstance(modules[sub], (nn.Conv2d, nn.Linear)), (model_name, sub)
    assert isinstance(built("vgg16_bn").features, nn.Sequential)
    assert len(built("resnet18").layer1[0].shortcut) == 0  # identity shortcut
    assert len(built("resnet56").layer1) == 9


def test_lenet5_has_no_relu_after_convolutions():
    children = [type(m) for m in built("lenet5_caffe").children()]
    assert children[:4] == [nn.Conv2d, nn.MaxPool2d, nn.Conv2d, nn.MaxPool2d]


def test_mlpnet_outputs_log_probabilities_and_has_no_bias():
    model = built("mlpnet")
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    with torch.no_grad():
        out = model(torch.randn(4, 1, 28, 28))
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(4), atol=1e-5)
    target = torch.tensor([0, 1, 2, 3])
    ce = nn.functional.cross_entropy(out, target)
    assert torch.allclose(ce, nn.functional.nll_loss(out, target), atol=1e-6)


@pytest.mark.parametrize("alias, canonical", [
    ("lenet5", "lenet5_caffe"), ("LeNet-300-100", "lenet_300_100"), ("lenet-300-100", "lenet_300_100"),
    ("vgg11", "vgg11_bn"), ("vgg13", "vgg13_bn"), ("VGG16", "vgg16_bn"), ("vgg19", "vgg19_bn"),
    ("vgg16-bn", "vgg16_bn"), ("VGG19-Kuangliu", "vgg19_kuangliu"), ("ResNet-20", "resnet20"),
    ("Synflow-MLP", "synflow_mlp"), (" resnet56 ", "resnet56"),
])
def test_aliases_and_spelling(alias, canonical):
    assert canonical_name(alias) == canonical
    assert model_info(alias).name == canonical


def test_alias_builds_same_model():
    torch.manual_seed(3)
    a = get_model("vgg11")
    torch.manual_seed(3)
    b = get_model("VGG11_BN")
    assert type(a) is type(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5_caffe", "mlpnet", "synflow_mlp", "resnet20", "vgg11_bn",
                                  "resnet18"])
def test_construction_is_deterministic(name):
    torch.manual_seed(7)
    a = get_model(name).state_dict()
    torch.manual_seed(7)
    b = get_model(name).state_dict()
    torch.manual_seed(8)
    c = get_model(name).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


@pytest.mark.parametrize("bad, near", [("resnet2", "resnet20"), ("vgg16bnn", "vgg16_bn"), ("lenet5_cafe", "lenet5_caffe"),
                                       ("mlpnett", "mlpnet"), ("resnet-19", "resnet18")])
def test_unknown_name_suggests_close_name(bad, near):
    with pytest.raises(PrunekitError, match=repr(near)):
        get_model(bad)
    with pytest.raises(PrunekitError, match="unknown model"):
        model_info(bad)


def test_model_info():
    info = model_info("resnet20")
    assert isinstance(info, ModelInfo)
    assert (info.name, info.default_input_shape, info.family) == ("resnet20", (3, 32, 32), "resnet")
    assert info.summary and "\n" not in info.summary
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "x"
    families = {n: model_info(n).family for n in model_names()}
    assert set(families.values()) == {"mlp", "lenet", "vgg", "resnet", "efficientnet"}
    assert families["lenet5_caffe"] == "lenet" and families["mlpnet"] == "mlp" and families["vgg19_kuangliu"] == "vgg"
    assert model_info("lenet5").default_input_shape == (1, 28, 28)


@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.5, True, "10"])
def test_bad_num_classes(num_classes):
    with pytest.raises(PrunekitError, match="num_classes"):
        get_model("mlpnet", num_classes=num_classes)


@pytest.mark.parametrize("name, shape", [
    ("lenet5_caffe", (1, 8, 8)), ("lenet5_caffe", (784,)), ("vgg16_bn", (3, 16, 16)), ("vgg16_bn", (3, 64, 64)),
    ("vgg19_kuangliu", (3, 28, 28)), ("resnet20", (3, 32)), ("resnet18", (3, 0, 32)), ("mlpnet", ()),
    ("mlpnet", (1, -28, 28)), ("synflow_mlp", "abc"), ("lenet_300_100", 784),
])
def test_bad_input_shape(name, shape):
    with pytest.raises(PrunekitError):
        get_model(name, input_shape=shape)


def test_bad_resnet_depth():
    from prunekit.models import CifarResNet, VGG
    with pytest.raises(PrunekitError, match="6n\\+2"):
        CifarResNet(depth=21)
    with pytest.raises(PrunekitError):
        VGG(depth=12)


def test_other_input_shapes_and_classes():
    model = get_model("lenet_300_100", num_classes=100, input_shape=(3, 32, 32))
    assert model.fc1.in_features == 3072 and model.input_shape == (3, 32, 32) and model.num_classes == 100
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    model = get_model("mlpnet", input_shape=[784])
    assert model.input_shape == (784,) and model(torch.randn(2, 784)).shape == (2, 10)
    model = get_model("lenet5", input_shape=(3, 32, 32))
    assert model.fc1.in_features == 1250 and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model = get_model("resnet20", num_classes=100, input_shape=(1, 28, 28))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 100)
    model = get_model("resnet18", input_shape=(3, 64, 64))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_init_schemes():
    vgg = built("vgg16_bn")
    for m in vgg.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    big = vgg.features[-3].weight  # 512x512x3x3; Kaiming-normal fan-in: std sqrt(2 / fan_in)
    assert abs(big.std().item() / (2 / big[0].numel()) ** 0.5 - 1) < 0.02
    resnet = built("resnet56")
    assert all(torch.all(m.weight == 1) for m in resnet.modules() if isinstance(m, nn.BatchNorm2d))
    w = resnet.layer3[1].conv1.weight
    assert abs(w.std().item() / (2 / w[0].numel()) ** 0.5 - 1) < 0.05


@pytest.mark.parametrize("name", ["vgg19_kuangliu", "resnet20", "resnet18", "mlpnet"])
def test_backward(name):
    model = get_model(name)
    out = model(torch.randn(2, *model.input_shape))
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())
