"""The pieces of pfp's fast channel-sensitivity path against the plain computations they replace, value for value:
the patch rows (one strided copy) against unfold + transpose, the reciprocals against the old ``where`` formula, the
pre-activations (one ``mm``) against the per-weight path's ``einsum``, the sub-block bounds against the dense
maximum, and pfp's masks on a net whose layers read negative inputs against the per-weight path."""
import copy
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.families.sensitivity import channel_bounds as B
from prunekit.families.sensitivity import kernels as K
from prunekit.families.sensitivity import scores as S
from prunekit.params import prunable_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2), dict(kernel_size=1),
    dict(kernel_size=(3, 5), padding=(2, 1), stride=(2, 1), dilation=(1, 2)),
    dict(kernel_size=3, padding=1, padding_mode="reflect"), dict(kernel_size=3, padding="same")])
def test_patch_rows_are_the_transposed_patches(kw):
    layer = S.layer_view(prunable_params(nn.Sequential(nn.Conv2d(4, 6, **kw)))[0])
    x = torch.randn(3, 4, 9, 11, generator=torch.Generator().manual_seed(0))
    a = S.patches(layer, x)
    assert torch.equal(S.patch_rows(layer, x), a.permute(1, 0, 2).reshape(a.shape[1], -1))


def test_reciprocal_equals_the_where_formula():
    z = torch.tensor([0.0, -0.0, 1e-9, -1e-9, K.EPS, -K.EPS, 2 * K.EPS, 0.5, -3.0, float("inf"), float("-inf"),
                      float("nan"), 1e30, 1.1920929e-07])
    for dtype in (torch.float32, torch.float64):
        zz = z.to(dtype)
        az = zz.abs()
        want = torch.where(az > K.EPS, az.clamp(min=K.EPS).reciprocal(), torch.zeros_like(az))
        got = K.reciprocal(zz)
        assert torch.equal(got, want) and got.dtype == dtype


@pytest.mark.parametrize("I, J, n, P", [(16, 144, 8, 1024), (64, 576, 8, 64), (10, 512, 8, 1), (7, 33, 5, 13)])
def test_pre_activations_equal_the_einsum(I, J, n, P):
    """One mm on the (input, row) layout gives the einsum's values bit for bit (what keeps the fast path's
    sensitivities equal to the per-weight path's on this platform)."""
    g = torch.Generator().manual_seed(I + J)
    w = torch.randn(I, J, generator=g)
    a = torch.relu(torch.randn(n, J, P, generator=g))
    at = a.permute(1, 0, 2).reshape(J, n * P)
    for ws in (w.clamp(min=0), w.clamp(max=0)):
        want = torch.einsum("ij,njp->nip", ws, a).permute(1, 0, 2).reshape(I, -1)
        assert torch.equal(B._pre_activations(ws, None, at), want)
        assert torch.equal(B._pre_activations(ws, a, at), want)


@pytest.mark.parametrize("P", [700, 64 * 11])
def test_sub_block_bounds_give_the_dense_maximum(P):
    """Heavy-tailed reciprocals and sparse inputs, R not (P = 700) and exactly (P = 704) a multiple of the block,
    three chunks of a running maximum: bitwise the per-weight path's channel maxima."""
    g = torch.Generator().manual_seed(P)
    I, C, k, n = 20, 12, 9, 6
    w = torch.randn(I, C * k, generator=g)
    alive = (torch.rand(I, C * k, generator=g) > 0.3).float()
    best = torch.zeros(C)
    want = torch.zeros(C)
    for _ in range(3):
        a = torch.relu(torch.randn(n, C * k, P, generator=g)) ** 3
        a[:, 2 * k:3 * k] = 0  # a channel never active in this chunk
        B.channel_contributions(w, a, k, best, alive)
        dense = (K.relative_contributions(w, a, "max") * alive).view(I, C, k).amax(dim=(0, 2))
        want = torch.maximum(want, dense)
        assert torch.equal(best, want)
    assert n * P * I * C * k > K.BLOCK_ELEMS  # the bound path, not the dense one


def test_negative_inputs_same_masks_as_the_per_weight_path():
    """Layers that read negative inputs (no ReLU in between: each example becomes max(a, 0) and max(-a, 0)) go
    through the patch rows on the fast path; masks and weights equal the per-weight path's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, padding=1),
                        nn.Conv2d(16, 16, 3, stride=2), nn.Flatten(), nn.Linear(16 * 7 * 7, 10)).eval()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    data = [(x, torch.zeros(6, dtype=torch.long))]
    out = {}
    for per_weight in (False, True):
        m = copy.deepcopy(net)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            masks = pk.prune(m, "pfp", 0.5, data, sample_size=6, per_weight_scores=per_weight)
        out[per_weight] = (masks.as_dict(), m.state_dict())
    assert all(torch.equal(out[False][0][k], out[True][0][k]) for k in out[True][0])
    assert all(torch.equal(out[False][1][k], out[True][1][k]) for k in out[True][1])
    assert 0 < sum(int(v.sum()) for v in out[False][0].values()) < sum(v.numel() for v in out[False][0].values())
