"""Second-order baselines of seed 003: magni, globalmagni, naivehess, diagfisher, kfac (second_order.md §7)."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
import prunekit.criteria.second_order_baselines as sob  # registers the codes
from prunekit.prune import default_loss, split_options
from prunekit.registry import ScoreContext
from prunekit.select import keep_count

CODES = ("magni", "globalmagni", "naivehess", "diagfisher", "kfac")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def conv_net(seed=0, stride=1):
    """Conv2d(2→3, 3x3, pad 1) on 2x4x4 (P = 16 at stride 1), Tanh, Linear(48 → 5); float64."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=stride)
    side = 4 if stride == 1 else 2
    m = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * side * side, 5)).double()
    m.input_shape = (2, 4, 4)
    return m


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def batches(n, shape, classes, seed=1, size=7):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    Y = torch.randint(0, classes, (n,), generator=g)
    return [(X[a:a + size], Y[a:a + size]) for a in range(0, n, size)], X, Y


def make_ctx(model, code, data, masks=None, seed=0, **opts):
    info = pk.get_method(code)
    _, mo = split_options(info, opts)
    masks = masks or pk.Masks(model)
    return ScoreContext(model=model, params=masks.params, masks=masks.as_dict(), data=data, loss=default_loss,
                        options=mo, generator=torch.Generator().manual_seed(seed))


def flat_weights(model):
    return [p for n, p in model.named_parameters() if n.endswith("weight")]


# ------------------------------------------------------------------------------------------------- registration


def test_registered_with_typed_options():
    for code in CODES:
        info = pk.get_method(code)
        assert info.sources == ("003",)
        assert info.options is not None
    assert pk.get_method("kfac").update is not None
    for code in ("magni", "globalmagni", "naivehess", "diagfisher"):
        assert pk.get_method(code).update is None
    assert set(pk.get_method("kfac").option_names()) >= {"kfac_samples", "fisher_damp", "kfac_pi", "true_fisher",
                                                         "scale_prune_update"}
    with pytest.raises(pk.PrunekitError, match="fisher_damp"):
        pk.get_method("kfac").make_options(fisher_damp=0.0)
    with pytest.raises(pk.PrunekitError, match="hessian_diag"):
        pk.get_method("naivehess").make_options(hessian_diag="lanczos")


# ---------------------------------------------------------------------------------------------------- magnitude


def test_magni_exact_count_per_layer():
    m = conv_net()
    w0 = [w.detach().clone() for w in flat_weights(m)]
    masks = pk.prune(m, "magni", 0.8, scope="layer")
    for w, (name, mask) in zip(w0, masks.items()):
        k = keep_count(w.numel(), 0.8)
        assert int(mask.sum()) == k
        kept = w.abs().reshape(-1)[mask.reshape(-1)]
        dropped = w.abs().reshape(-1)[~mask.reshape(-1)]
        assert kept.min() >= dropped.max()


def test_prune_enforces_the_fixed_scope():
    with pytest.raises(pk.PrunekitError, match="use method 'globalmagni'"):
        pk.prune(conv_net(), "magni", 0.5, scope="global")
    with pytest.raises(pk.PrunekitError, match="use method 'magni'"):
        pk.prune(conv_net(), "globalmagni", 0.5, scope="layer")
    masks = pk.prune(conv_net(), "magni", 0.8)  # no scope given: layer-wise
    assert int(masks["0.weight"].sum()) == keep_count(54, 0.8)
    assert int(masks["3.weight"].sum()) == keep_count(240, 0.8)
    assert pk.prune(conv_net(), "magnitude", 0.5, scope="layer").report["scope"] == "layer"


def test_globalmagni_exact_global_count():
    m = conv_net()
    w = torch.cat([w.detach().abs().reshape(-1) for w in flat_weights(m)])
    masks = pk.prune(m, "globalmagni", 0.75)
    keep = torch.cat([v.reshape(-1) for v in masks.as_dict().values()])
    assert int(keep.sum()) == keep_count(w.numel(), 0.75)
    assert w[keep].min() >= w[~keep].max()


def test_globalmagni_flops_power_by_hand():
    m = conv_net()
    conv, lin = m[0], m[3]
    # hand counts: conv P = 4·4 = 16 positions, 54 weights; linear P = 1, 240 weights
    phi_conv, phi_lin = 54 * 16, 240 * 1
    s = pk.score(m, "globalmagni", flops_power=0.5)
    torch.testing.assert_close(s["0.weight"], conv.weight.detach().abs() / phi_conv ** 0.5)
    torch.testing.assert_close(s["3.weight"], lin.weight.detach().abs() / phi_lin ** 0.5)
    s = pk.score(m, "globalmagni", flops_power=0.3, flops_per_param=True)
    torch.testing.assert_close(s["0.weight"], conv.weight.detach().abs() / 16 ** 0.3)
    torch.testing.assert_close(s["3.weight"], lin.weight.detach().abs())
    # φ uses the current nnz: prune half of the conv first
    masks = pk.Masks(m)
    cm = torch.ones_like(conv.weight, dtype=torch.bool)
    cm.view(-1)[:27] = False
    masks.set({"0.weight": cm})
    s = pk.score(m, "globalmagni", masks=masks, flops_power=1.0)
    torch.testing.assert_close(s["0.weight"], conv.weight.detach().abs() / (27 * 16))
    # equal magnitudes: the layer with the larger φ (the conv) loses its weights first
    for per_param in (False, True):
        m2 = conv_net()
        with torch.no_grad():
            for w in flat_weights(m2):
                w.copy_(torch.sign(w) + (w == 0))
        masks = pk.prune(m2, "globalmagni", 0.1, flops_power=0.3, flops_per_param=per_param)
        n_prune = 294 - keep_count(294, 0.1)
        assert int((~masks["0.weight"]).sum()) == n_prune
        assert bool(masks["3.weight"].all())
    # without input_shape the reweighting says what it needs
    m3 = conv_net()
    del m3.input_shape
    with pytest.raises(pk.PrunekitError, match="input_shape"):
        pk.score(m3, "globalmagni", flops_power=1.0)
    pk.score(m3, "globalmagni", flops_power=1.0, input_shape=[2, 4, 4])


# ---------------------------------------------------------------------------------------------------- naivehess


def full_hessian(model, X, Y):
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    w0 = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])

    def f(flat):
        ps, off = {}, 0
        for n, sh in zip(names, shapes):
            k = math.prod(sh)
            ps[n] = flat[off:off + k].view(sh)
            off += k
        return F.cross_entropy(torch.func.functional_call(model, ps, (X,)), Y)

    return torch.autograd.functional.hessian(f, w0), w0


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_naivehess_exact_diagonal_matches_autograd_hessian(net):
    m = mlp() if net == "mlp" else conv_net()
    data, X, Y = batches(20, (3,) if net == "mlp" else (2, 4, 4), 3 if net == "mlp" else 5)
    H, _ = full_hessian(m, X, Y)
    ctx = make_ctx(m, "naivehess", data, hess_samples=20, hess_batch=6, hvp_chunk=5)
    d = sob.hessian_diagonal(ctx)
    got = torch.cat([d[n].reshape(-1) for n in ctx.masks])
    torch.testing.assert_close(got, torch.diagonal(H), rtol=1e-9, atol=1e-12)
    # only the first hess_samples examples count
    H12, _ = full_hessian(m, X[:12], Y[:12])
    d12 = sob.hessian_diagonal(make_ctx(m, "naivehess", data, hess_samples=12))
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in d12.values()]), torch.diagonal(H12))


def test_naivehess_hutchinson_converges():
    m = mlp()
    data, X, Y = batches(20, (3,), 3)
    H, _ = full_hessian(m, X, Y)
    exact = torch.diagonal(H)
    off = (H - torch.diag(exact)).pow(2).sum(1)  # Var(z_i·(Hz)_i) = Σ_{j≠i} H_ij²

    def est(k, seed=0):
        d = sob.hessian_diagonal(make_ctx(m, "naivehess", data, seed=seed, hess_samples=20, hess_batch=8,
                                          hessian_diag="hutchinson", hutchinson_probes=k, hvp_chunk=500))
        return torch.cat([v.reshape(-1) for v in d.values()])

    big = est(4000)
    assert bool(((big - exact).abs() <= 5 * (off / 4000).sqrt() + 1e-12).all())
    assert (big - exact).norm() < (est(10) - exact).norm()
    torch.testing.assert_close(est(50, seed=3), est(50, seed=3))  # seeded from ctx.generator


def test_naivehess_shift_and_ordering():
    m = mlp(seed=2)
    data, X, Y = batches(20, (3,), 3)
    H, w0 = full_hessian(m, X, Y)
    raw = 0.5 * w0 ** 2 * torch.diagonal(H)
    assert raw.min() < 0  # the test needs negative curvature terms
    s = pk.score(m, "naivehess", data=data, hess_samples=20)
    got = torch.cat([v.reshape(-1) for v in s.values()])
    torch.testing.assert_close(got, raw - raw.min())
    assert float(got.min()) == 0.0
    masks = pk.prune(copy.deepcopy(m), "naivehess", 1 / 24, data=data, hess_samples=20)
    keep = torch.cat([v.reshape(-1) for v in masks.as_dict().values()])
    assert int((~keep).sum()) == 1 and int(torch.nonzero(~keep)) == int(raw.argmin())  # most negative first


def test_naivehess_warns_above_max_exact_hvp():
    m = mlp()
    data, _, _ = batches(10, (3,), 3)
    with pytest.warns(UserWarning, match=r"24 Hessian-vector products.*hutchinson"):
        pk.score(m, "naivehess", data=data, hess_samples=10, max_exact_hvp=23)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.score(m, "naivehess", data=data, hess_samples=10, max_exact_hvp=24)
        pk.score(m, "naivehess", data=data, hess_samples=10, max_exact_hvp=1, hessian_diag="hutchinson",
                 hutchinson_probes=4)
    with pytest.warns(UserWarning, match="fewer than hess_samples"):
        pk.score(m, "naivehess", data=data)


# --------------------------------------------------------------------------------------------------- diagfisher


def test_diagfisher_equals_per_sample_loop():
    m = conv_net()
    data, X, Y = batches(20, (2, 4, 4), 5)
    masks = pk.Masks(m)
    mk = torch.rand(m[3].weight.shape, generator=torch.Generator().manual_seed(5)) > 0.3
    masks.set({"3.weight": mk})
    ws = flat_weights(m)
    sq = [torch.zeros_like(w) for w in ws]
    N = 13
    for i in range(N):
        g = torch.autograd.grad(F.cross_entropy(m(X[i:i + 1]), Y[i:i + 1]), ws)
        for acc, gi in zip(sq, g):
            acc += gi ** 2
    s = pk.score(m, "diagfisher", data=data, masks=masks, diag_fisher_samples=N)
    for (name, mask), w, acc in zip(masks.items(), ws, sq):
        want = 0.5 * w.detach() ** 2 * (acc / N) * mask
        torch.testing.assert_close(s[name], want)
    with pytest.warns(UserWarning, match="fewer than diag_fisher_samples=4096"):
        pk.score(m, "diagfisher", data=data)


# --------------------------------------------------------------------------------------------------------- kfac


def explicit_factors(model, X, Y, stride=1):
    """A and Γ of the conv and the linear layer of conv_net by explicit loops over examples and positions."""
    conv, lin = model[0], model[3]
    N = X.shape[0]
    A1 = torch.zeros(18, 18, dtype=torch.float64)
    G1 = torch.zeros(3, 3, dtype=torch.float64)
    A2 = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64)
    G2 = torch.zeros(5, 5, dtype=torch.float64)
    for n in range(N):
        x = X[n:n + 1]
        z1 = conv(x)
        h = torch.tanh(z1).flatten(1)
        z2 = lin(h)
        d1, d2 = torch.autograd.grad(F.cross_entropy(z2, Y[n:n + 1]), (z1, z2))
        xp = F.pad(x, (1, 1, 1, 1))
        Ho, Wo = z1.shape[2], z1.shape[3]
        for r in range(Ho):
            for c in range(Wo):
                a = xp[0, :, r * stride:r * stride + 3, c * stride:c * stride + 3].reshape(-1)  # (channel, kh, kw)
                A1 += torch.outer(a, a) / (N * Ho * Wo)
                dl = d1[0, :, r, c]
                G1 += torch.outer(dl, dl) / N
        a = h[0].detach()
        A2 += torch.outer(a, a) / N
        G2 += torch.outer(d2[0], d2[0]) / N
    return {"0.weight": (A1, G1), "3.weight": (A2, G2)}


@pytest.mark.parametrize("stride", [1, 2])
def test_kfac_factors_match_explicit_loops(stride):
    m = conv_net(stride=stride)
    data, X, Y = batches(20, (2, 4, 4), 5)
    ctx = make_ctx(m, "kfac", data, kfac_samples=15, kfac_batch=4)
    fac = sob.kfac_factors(ctx)
    want = explicit_factors(m, X[:15], Y[:15], stride=stride)
    for name, (A, G) in want.items():
        torch.testing.assert_close(fac[name].A, A)
        torch.testing.assert_close(fac[name].G, G)


def test_kfac_true_fisher_samples_labels_from_the_model():
    m = conv_net()
    data, X, Y = batches(12, (2, 4, 4), 5)
    fac = sob.kfac_factors(make_ctx(m, "kfac", data, seed=7, kfac_samples=12, kfac_batch=12, true_fisher=True))
    with torch.no_grad():
        probs = torch.softmax(m(X), 1)
    ys = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).squeeze(1)
    want = explicit_factors(m, X, ys)
    for name, (A, G) in want.items():
        torch.testing.assert_close(fac[name].G, G)
    assert not torch.allclose(want["3.weight"][1], explicit_factors(m, X, Y)["3.weight"][1])


@pytest.mark.parametrize("pi", [False, True])
def test_kfac_factored_inverse_matches_explicit_kronecker(pi):
    m = conv_net()
    data, X, Y = batches(20, (2, 4, 4), 5)
    lam = 1e-2
    ctx = make_ctx(m, "kfac", data, kfac_samples=20, fisher_damp=lam, kfac_pi=pi)
    fac = sob.kfac_factors(ctx)
    scores = sob.kfac(make_ctx(m, "kfac", data, kfac_samples=20, fisher_damp=lam, kfac_pi=pi))
    for name, w in zip(("0.weight", "3.weight"), flat_weights(m)):
        f = fac[name]
        A, G = f.A, f.G
        p = (torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]) if pi else 1.0
        assert f.pi == pytest.approx(float(p))
        Ad = A + math.sqrt(lam * p) * torch.eye(A.shape[0], dtype=torch.float64)
        Gd = G + math.sqrt(lam / p) * torch.eye(G.shape[0], dtype=torch.float64)
        Finv = torch.linalg.inv(torch.kron(Gd, Ad))  # row-major W (out × in·kh·kw): index i·in + j
        torch.testing.assert_close(f.inv_diag.reshape(-1), torch.diagonal(Finv))
        V = torch.randn(Gd.shape[0], Ad.shape[0], dtype=torch.float64)
        torch.testing.assert_close((f.G_inv @ V @ f.A_inv).reshape(-1), Finv @ V.reshape(-1))
        wf = w.detach().reshape(-1)
        torch.testing.assert_close(scores[name].reshape(-1), wf ** 2 / (2 * torch.diagonal(Finv)))


@pytest.mark.parametrize("sigma", [1.0, 0.7, 0.0])
def test_kfac_update_is_summed_obs_with_explicit_inverse(sigma):
    m = conv_net()
    data, X, Y = batches(20, (2, 4, 4), 5)
    lam = 1e-3
    opts = dict(kfac_samples=20, fisher_damp=lam, scale_prune_update=sigma)
    fac = sob.kfac_factors(make_ctx(m, "kfac", data, **opts))
    w0 = {n: w.detach().clone() for n, w in zip(("0.weight", "3.weight"), flat_weights(m))}
    masks = pk.prune(m, "kfac", 0.6, data=data, **opts)
    for name, w in zip(w0, flat_weights(m)):
        f = fac[name]
        Ad = f.A + math.sqrt(lam) * torch.eye(f.A.shape[0], dtype=torch.float64)
        Gd = f.G + math.sqrt(lam) * torch.eye(f.G.shape[0], dtype=torch.float64)
        Finv = torch.linalg.inv(torch.kron(Gd, Ad))
        keep = masks[name].reshape(-1)
        wf = w0[name].reshape(-1)
        u = torch.where(~keep, wf / torch.diagonal(Finv), torch.zeros_like(wf))
        want = wf - sigma * (Finv @ u)
        got = w.detach().reshape(-1)
        assert bool((got[~keep] == 0).all())  # pruned entries exactly zero after the masks apply
        torch.testing.assert_close(got[keep], want[keep])
        if sigma == 0:
            assert torch.equal(got[keep], wf[keep])


class SeqNet(nn.Module):
    """Linear over a sequence [n, T, 4] (T positions), mean over T, Linear to 3 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).mean(1))


def test_kfac_linear_positions_match_explicit_loop():
    m = SeqNet().double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(9, 5, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (9,), generator=g)
    fac = sob.kfac_factors(make_ctx(m, "kfac", [(X[:4], Y[:4]), (X[4:], Y[4:])], kfac_samples=9, kfac_batch=3))
    A = torch.zeros(4, 4, dtype=torch.float64)
    G = torch.zeros(6, 6, dtype=torch.float64)
    for n in range(9):
        z = m.a(X[n:n + 1])
        (d,) = torch.autograd.grad(F.cross_entropy(m.b(torch.tanh(z).mean(1)), Y[n:n + 1]), z)
        for t in range(5):
            A += torch.outer(X[n, t], X[n, t]) / (9 * 5)
            G += torch.outer(d[0, t], d[0, t]) / 9
    torch.testing.assert_close(fac["a.weight"].A, A)
    torch.testing.assert_close(fac["a.weight"].G, G)


def test_kfac_linear_with_bias_and_conv1d_grouped_modules():
    m = mlp()
    data, X, Y = batches(10, (3,), 3)
    s = pk.score(m, "kfac", data=data, kfac_samples=10, include_bias=True)
    assert set(s) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    masks = pk.prune(m, "kfac", 0.5, data=data, kfac_samples=10, include_bias=True)
    assert all(bool((p.tensor[~masks[p.name]] == 0).all()) for p in masks.params)
    # Conv1d and grouped Conv2d were refused before; tests/test_kfac_groups.py checks their values
    y = torch.tensor([0, 1, 0, 1])
    conv1d = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(9, 2)).double()
    s = pk.score(conv1d, "kfac", data=[(torch.randn(4, 2, 5, dtype=torch.float64), y)], kfac_samples=4)
    assert s["0.weight"].shape == (3, 2, 3) and bool(torch.isfinite(s["0.weight"]).all())
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 2)).double()
    s = pk.score(grouped, "kfac", data=[(torch.randn(4, 2, 4, 4, dtype=torch.float64), y)], kfac_samples=4)
    assert s["0.weight"].shape == (2, 1, 3, 3) and bool(torch.isfinite(s["0.weight"]).all())


# ------------------------------------------------------------------------------------------- purity and counts


def bn_net():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                      nn.Linear(48, 5))
    m.input_shape = (2, 4, 4)
    return m


@pytest.mark.parametrize("code,opts", [
    ("globalmagni", dict(flops_power=0.5)),
    ("naivehess", dict(hess_samples=12)),
    ("naivehess", dict(hess_samples=12, hessian_diag="hutchinson", hutchinson_probes=8)),
    ("diagfisher", dict(diag_fisher_samples=12)),
    ("kfac", dict(kfac_samples=12, true_fisher=True)),
])
def test_scoring_is_pure(code, opts):
    m = bn_net()
    m.train()
    m[1].eval()  # mixed modes must come back as they were
    m[0].weight.grad = torch.ones_like(m[0].weight)
    m[0].bias.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(2)]
    state = copy.deepcopy(m.state_dict())
    modes = [mod.training for mod in m.modules()]
    rng = torch.get_rng_state()
    pk.score(m, code, data=data, **opts)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [mod.training for mod in m.modules()] == modes
    assert torch.equal(m[0].weight.grad, torch.ones_like(m[0].weight)) and m[5].weight.grad is None
    assert not m[0].bias.requires_grad and m[0].weight.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("code", CODES)
def test_exact_counts_and_nested_masks_through_prune(code):
    m = conv_net()
    data, _, _ = batches(14, (2, 4, 4), 5)
    opts = {"naivehess": dict(hess_samples=14), "diagfisher": dict(diag_fisher_samples=14),
            "kfac": dict(kfac_samples=14)}.get(code, {})
    scope = "layer" if code == "magni" else "global"
    sizes = {"0.weight": 54, "3.weight": 240}

    def check(masks, s):
        if scope == "layer":
            for n, k in sizes.items():
                assert int(masks[n].sum()) == keep_count(k, s)
        else:
            assert masks.kept() == keep_count(294, s)
        for p in masks.params:
            assert bool((p.tensor[~masks[p.name]] == 0).all())

    masks = pk.prune(m, code, 0.5, data=data, scope=scope, rounds=2, **opts)
    check(masks, 0.5)
    before = {n: v.clone() for n, v in masks.items()}
    masks = pk.prune(m, code, 0.8, data=data, scope=scope, masks=masks, **opts)
    check(masks, 0.8)
    for n, v in masks.items():
        assert not bool((v & ~before[n]).any())  # nested
