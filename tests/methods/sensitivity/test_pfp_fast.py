"""pfp's channel-level sensitivity path (the default) against the per-weight path (``per_weight_scores=True``,
the old computation): bitwise equal channel sensitivities, identical masks."""
import copy
import warnings

import pytest
import torch

import prunekit as pk
from prunekit.families.sensitivity import channel_bounds as B
from prunekit.families.sensitivity import kernels as K
from prunekit.models import get_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_channel_max(w, a, k, alive):
    """The plain reference (the per-weight path): every g_ij, zero on dead entries, then the max per channel."""
    g = K.relative_contributions(w, a, "max") * alive
    return g.view(w.shape[0], -1, k).amax(dim=(0, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_contributions_equal_the_dense_maximum(dtype):
    g = torch.Generator().manual_seed(0)
    I, C, k, n, P = 24, 16, 9, 6, 700   # R·I·J above BLOCK_ELEMS: the bound path
    w = torch.randn(I, C * k, generator=g, dtype=dtype)
    a = torch.relu(torch.randn(n, C * k, P, generator=g, dtype=dtype)) ** 3   # heavy-tailed, sparse inputs
    a[:, :k] = 0  # a channel never active: 0
    alive = torch.rand(I, C * k, generator=g) > 0.2
    assert n * P * I * C * k > K.BLOCK_ELEMS
    best = torch.zeros(C, dtype=dtype)
    B.channel_contributions(w, a, k, best, alive.to(dtype))
    want = _dense_channel_max(w, a, k, alive.to(dtype))
    assert torch.equal(best, want)
    assert float(best[0]) == 0.0 and bool((best[1:] > 0).all())
    # a running maximum: a second chunk only raises it, to the maximum over both
    a2 = torch.relu(torch.randn(n, C * k, P, generator=g, dtype=dtype))
    B.channel_contributions(w, a2, k, best, alive.to(dtype))
    assert torch.equal(best, torch.maximum(want, _dense_channel_max(w, a2, k, alive.to(dtype))))


@pytest.mark.parametrize("name, n, sparsity", [
    ("resnet20", 8, 0.6),
    pytest.param("vgg11_bn", 16, 0.5, marks=pytest.mark.slow),
    pytest.param("resnet20", 32, 0.6, marks=pytest.mark.slow)])
def test_same_masks_as_the_per_weight_path(name, n, sparsity):
    torch.manual_seed(0)
    model = get_model(name, num_classes=10).eval()
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    data = [(x, torch.zeros(n, dtype=torch.long))]
    out = {}
    for per_weight in (False, True):
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            masks = pk.prune(m, "pfp", sparsity, data, sample_size=n, per_weight_scores=per_weight,
                             round_channels=1 if name == "vgg11_bn" else 8)
        out[per_weight] = (masks.as_dict(), dict(m.state_dict()))
    fast, slow = out[False], out[True]
    assert all(torch.equal(fast[0][k], slow[0][k]) for k in slow[0])
    assert all(torch.equal(fast[1][k], slow[1][k]) for k in slow[1])  # the update (make_exact) is the same too


def test_scores_of_the_two_paths():
    """Readers: the channel sensitivity on each alive entry equals the per-weight path's channel max; the first
    layer (image input) is not measured by default: +inf."""
    torch.manual_seed(0)
    model = get_model("vgg11_bn", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    data = [(x, torch.zeros(2, dtype=torch.long))]
    fast = pk.score(model, "pfp", data, sample_size=2)
    slow = pk.score(model, "pfp", data, sample_size=2, per_weight_scores=True)
    assert bool(torch.isinf(fast["features.0.weight"]).all())
    for name in ("features.4.weight", "features.8.weight", "fc.weight"):
        c = slow[name].shape[1] if slow[name].dim() == 4 else 512
        s_slow = slow[name].reshape(slow[name].shape[0], c, -1).amax(dim=(0, 2))
        f = fast[name].reshape(fast[name].shape[0], c, -1)
        assert torch.equal(f.amax(dim=(0, 2)), s_slow) and torch.equal(f.amin(dim=(0, 2)), s_slow)
