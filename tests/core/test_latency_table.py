"""The per-layer latency table (measured once per device and layer shape, cached on disk atomically) and
``round_channels: "auto"``."""
import json
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.models import get_model
from prunekit.structured.latency_table import LatencyTable, auto_round_channels, check_round_channels

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_timer(multiple):
    """Seconds proportional to the layer's MACs, three times slower per MAC when its output width is not a
    multiple of ``multiple`` (a machine whose kernels like that multiple)."""
    def timer(module, x):
        if isinstance(module, nn.Conv2d):
            out = module(x)
            work = out.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            width = module.out_channels
        else:
            work = x.numel() * module.out_features
            width = module.out_features
        return 1e-9 * work * (1.0 if width % multiple == 0 else 3.0)
    return timer


def test_measured_once_and_cached_on_disk(tmp_path):
    path = tmp_path / "lat.json"
    t1 = LatencyTable(path, timer=fake_timer(8), repeats=3)
    a = t1.conv2d(16, 24, 3, 1, 1, (8, 8), batch=2)
    b = t1.linear(32, 10, positions=1, batch=4)
    assert t1.measured == 2 and a > 0 and b > 0
    assert t1.conv2d(16, 24, 3, 1, 1, (8, 8), batch=2) == a and t1.measured == 2   # in memory
    t2 = LatencyTable(path, timer=fake_timer(8))
    assert t2.conv2d(16, 24, 3, 1, 1, (8, 8), batch=2) == a and t2.linear(32, 10, 1, 4) == b
    assert t2.measured == 0                                                        # read from the file
    stored = json.loads(path.read_text())
    assert len(stored) == 2 and all(isinstance(v, float) for v in stored.values())
    assert [p.name for p in tmp_path.iterdir()] == ["lat.json"]                     # no temporary file left
    # two tables writing the same file: the union is kept
    t3 = LatencyTable(path, timer=fake_timer(8))
    t2.conv2d(8, 8, 1, 1, 0, (4, 4))
    t3.conv2d(4, 4, 1, 1, 0, (4, 4))
    assert len(json.loads(path.read_text())) == 4


def test_a_broken_cache_is_a_clear_error(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text("[1, 2]")
    with pytest.raises(PrunekitError, match="delete it"):
        LatencyTable(path)


@pytest.mark.parametrize("multiple", [4, 8, 16])
def test_auto_picks_the_multiple_the_machine_likes(tmp_path, multiple):
    torch.manual_seed(0)
    model = get_model("vgg11_bn", num_classes=10).eval()
    table = LatencyTable(tmp_path / "lat.json", timer=fake_timer(multiple), repeats=1)
    assert auto_round_channels(model, (3, 32, 32), table, candidates=(1, 4, 8, 16, 32)) == multiple


def test_round_channels_auto_in_filter_l1(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_LATENCY_CACHE", str(tmp_path))
    import prunekit.structured.latency_table as lt
    monkeypatch.setattr(lt, "_wall", fake_timer(16))
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = pk.prune(model, "filter_l1", 0.4, round_channels="auto")
    small = pk.shrink(model, masks, torch.randn(2, 3, 32, 32))
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 16 == 0 for w in widths) and min(widths) < 64
    assert any(tmp_path.iterdir())  # the table went to the cache folder


def test_round_channels_values_are_checked():
    check_round_channels(8)
    check_round_channels("auto")
    for bad in (0, "fast", 2.5, True):
        with pytest.raises(PrunekitError, match="round_channels"):
            check_round_channels(bad)
    with pytest.raises(PrunekitError, match="round_channels"):
        pk.prune(get_model("lenet5_caffe"), "filter_l1", 0.5, round_channels="fast")


def test_prune_to_latency_meets_the_predicted_latency(tmp_path):
    """filter_l1 on ResNet-20 to half the predicted latency (deterministic timer): the shrunk model's layers, looked
    up in the same table at their real widths, add up to the reported time, within tol of half the dense one."""
    from prunekit.flops_target import prune_to_latency
    from prunekit.structured.latency_table import layer_ms, timed_layers

    table = LatencyTable(tmp_path / "lat.json", timer=fake_timer(8), repeats=1)
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).eval()
    dense_layers = timed_layers(model, (3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = prune_to_latency(model, "filter_l1", latency=0.5, table=table, tol=0.03, round_channels=8)
    r = masks.report
    small = pk.shrink(model, masks, torch.randn(2, 3, 32, 32))
    total = 0.0
    for name, (mod, shape) in timed_layers(small, (3, 32, 32)).items():
        c = (mod.in_channels, mod.out_channels) if isinstance(mod, nn.Conv2d) else (mod.in_features, mod.out_features)
        total += layer_ms(table, mod, (c[0],) + tuple(shape[1:]) if isinstance(mod, nn.Conv2d) else shape, *c)
    dense = sum(layer_ms(table, m, s, *((m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d)
                                       else (m.in_features, m.out_features))) for m, s in dense_layers.values())
    assert r["hit"] and abs(r["ms_fraction"] - 0.5) <= 0.03 * 0.5
    assert total == pytest.approx(r["ms"], rel=1e-9) and r["dense_ms"] == pytest.approx(dense, rel=1e-9)
    with pytest.raises(PrunekitError, match="structured method"):
        prune_to_latency(get_model("lenet5_caffe"), "magnitude", latency=0.5, table=table)
