"""Path-based pruning at init: ``synflow`` and ``px`` (pai.md sections 6.11, 6.12 and 7)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
import prunekit.criteria.paths  # noqa: F401  (registers synflow and px)
from prunekit.models import get_model


# ------------------------------------------------------------------------------------------------ helpers
def chain(widths, bias=False, act=nn.ReLU):
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def random_masks(model, keep=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = pk.Masks(model)
    masks.set({n: torch.rand(masks[n].shape, generator=g) < keep for n in masks.names()})
    return masks


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "req": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
    }


def assert_same(before, after):
    assert before["modes"] == after["modes"] and before["req"] == after["req"]
    assert before["dtypes"] == after["dtypes"]
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None and h is None) or torch.equal(g, h), k


def with_grads(model, x):
    model.train()
    model(x).square().mean().backward()


# ------------------------------------------------------------------------------------------------ synflow
def test_registered_with_typed_options():
    s, p = pk.get_method("synflow"), pk.get_method("px")
    assert (s.needs_data, s.default_rounds, s.sources, s.option_names()) == ("none", 100, ("004",), ["dtype"])
    assert s.options().dtype == "float64"
    assert (p.needs_data, p.default_rounds, p.sources) == ("inputs", 100, ("004",))
    assert p.options().px_variant == "head" and p.options().dtype == "float32"
    with pytest.raises(pk.PrunekitError, match="px_variant"):
        p.make_options(px_variant="tail")


def test_synflow_closed_form_conservation_and_pruned_zero():
    torch.manual_seed(0)
    model = chain([6, 5, 4, 3])
    model.input_shape = (6,)
    masks = random_masks(model, keep=0.75)
    scores = pk.score(model, "synflow", masks=masks)
    Ws = [m.weight.detach().double().abs() for m in linears(model)]  # masked: pruned weights are 0
    L = len(Ws)
    total = None
    for l, name in enumerate(masks.names()):
        left = torch.ones(1, 3, dtype=torch.float64)
        for W in reversed(Ws[l + 1:]):
            left = left @ W  # 1ᵀ|W_L|···|W_{l+1}|
        right = torch.ones(Ws[0].shape[1], 1, dtype=torch.float64)
        for W in Ws[:l]:
            right = W @ right  # |W_{l-1}|···|W_1|·1
        expected = left.reshape(-1, 1) * Ws[l] * right.reshape(1, -1)
        assert scores[name].dtype == torch.float64
        torch.testing.assert_close(scores[name], expected, rtol=1e-12, atol=0)
        assert (scores[name] >= 0).all()
        assert (scores[name][~masks[name]] == 0).all()
        layer_sum = float(scores[name].sum())
        total = layer_sum if total is None else total
        assert layer_sum == pytest.approx(total, rel=1e-12)  # conservation
    r_sf = float(torch.ones(1, 3, dtype=torch.float64) @ Ws[2] @ Ws[1] @ Ws[0] @ torch.ones(6, 1, dtype=torch.float64))
    assert total == pytest.approx(r_sf, rel=1e-12)
    assert L == 3


def test_synflow_float32_and_float64_masks_agree():
    torch.manual_seed(1)
    model = chain([10, 12, 8, 4], bias=True)
    model.input_shape = (10,)
    s64 = pk.score(model, "synflow")
    s32 = pk.score(model, "synflow", dtype="float32")
    m64 = pk.select(s64, None, 0.6)
    m32 = pk.select(s32, None, 0.6)
    flat = torch.cat([v.reshape(-1) for v in s64.values()])
    thr = torch.sort(flat, descending=True).values[pk.keep_count(flat.numel(), 0.6) - 1]
    for n in s64:
        differ = m64[n] != m32[n]
        assert torch.allclose(s64[n][differ], thr.expand_as(s64[n][differ]), rtol=1e-5)  # near-ties only
        torch.testing.assert_close(s32[n], s64[n], rtol=1e-4, atol=0)


def deep_mlp(depth, width, scale):
    torch.manual_seed(2)
    model = chain([width] * (depth + 1))
    with torch.no_grad():
        for m in linears(model):
            m.weight.uniform_(0.5, 1.5).mul_(scale)
    model.input_shape = (width,)
    return model


def test_synflow_float32_overflows_where_float64_is_finite():
    model = deep_mlp(60, 40, 0.25)  # ~10x per layer: R ~ 1e60, far beyond float32's 3e38
    with pytest.warns(UserWarning, match="not finite"):
        s32 = pk.score(model, "synflow", dtype="float32")
    assert any(not torch.isfinite(v).all() for v in s32.values())
    s64 = pk.score(model, "synflow")
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in s64.values())
    sums = [float(v.sum()) for v in s64.values()]
    assert max(sums) / min(sums) == pytest.approx(1.0, rel=1e-9)  # still conserved


def test_synflow_float64_overflow_raises_and_underflow_warns():
    with pytest.raises(pk.PrunekitError, match="float64"):
        pk.score(deep_mlp(60, 40, 1e5), "synflow")
    with pytest.warns(UserWarning, match="exactly 0"):
        s = pk.score(deep_mlp(40, 40, 1e-12), "synflow")
    assert all(torch.isfinite(v).all() for v in s.values())


def test_synflow_input_shape_from_data_or_error():
    torch.manual_seed(0)
    model = chain([6, 5, 3])
    with pytest.raises(pk.PrunekitError, match="input_shape"):
        pk.score(model, "synflow")
    a = pk.score(model, "synflow", data=[(torch.randn(2, 6), torch.zeros(2))])
    model.input_shape = (6,)
    b = pk.score(model, "synflow")
    for n in a:
        assert torch.equal(a[n], b[n])


def test_synflow_on_log_softmax_output_uses_logits():
    torch.manual_seed(0)
    model = get_model("mlpnet")
    s = pk.score(model, "synflow")
    plain = nn.Sequential(nn.Flatten(), model.fc1, nn.ReLU(), model.fc2, nn.ReLU(), model.fc3)
    plain.input_shape = model.input_shape
    ref = pk.score(plain, "synflow")
    for (n, v), w in zip(s.items(), ref.values()):
        torch.testing.assert_close(v, w, rtol=1e-12, atol=0)
        assert (v > 0).all()
    # module form too
    seq = nn.Sequential(*plain, nn.LogSoftmax(dim=1))
    seq.input_shape = model.input_shape
    for v, w in zip(pk.score(seq, "synflow").values(), ref.values()):
        torch.testing.assert_close(v, w, rtol=1e-12, atol=0)


def test_synflow_iterative_avoids_collapse_where_magnitude_collapses():
    def build():
        torch.manual_seed(3)
        m = chain([20, 40, 40, 40, 5])
        with torch.no_grad():
            m[4].weight.mul_(0.01)  # a layer with a tiny init scale
        m.input_shape = (20,)
        return m

    mag = build()
    with pytest.warns(UserWarning, match="collapse"):
        pk.prune(mag, "magnitude", sparsity=0.99)
    assert "4.weight" in pk.Masks(mag).names() and int((mag[4].weight != 0).sum()) == 0

    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no collapse warning
        masks = pk.prune(model, "synflow", sparsity=0.99, rounds=20)
    n = masks.total()
    assert masks.kept() == pk.keep_count(n, 0.99)
    assert masks.collapsed() == []
    assert all(st.kept > 0 for st in masks.layer_stats())


def test_synflow_is_pure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    model.input_shape = (2, 6, 6)
    x = torch.randn(4, 2, 6, 6)
    with_grads(model, x)  # train mode, BN running stats moved, grads present
    masks = random_masks(model)
    before = snapshot(model)
    s = pk.score(model, "synflow", masks=masks)
    assert_same(before, snapshot(model))
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in s.values())
    assert all((s[n][~masks[n]] == 0).all() for n in masks.names())


# ------------------------------------------------------------------------------------------------- px
class FunctionalMLP(nn.Module):
    def __init__(self, widths, inplace=False):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        self.inplace = inplace

    def forward(self, x):
        for i, fc in enumerate(self.fcs):
            x = fc(x)
            if i < len(self.fcs) - 1:
                x = x.relu_() if self.inplace else F.relu(x)
        return x


def _relu(a):
    return a.clamp(min=0)


def _relu_gate(a):
    return (a > 0).double()


def px_by_hand(W, M, batches, variant="head", act=_relu, gate=_relu_gate):
    """PX scores of a bias-free 3-layer MLP with a piecewise-linear activation ``act`` of slope ``gate`` (ReLU by
    default), from the path formulas written out with matrices."""
    W1, W2, W3 = (w.double() for w in W)  # effective (masked) weights
    M1, M2, M3 = (m.double() for m in M)
    if variant == "head":
        U1, U2 = M1 * W1 ** 2, M2 * W2 ** 2
        v1 = U1 @ torch.ones(W1.shape[1], dtype=torch.float64)
        v2 = U2 @ v1
        s = torch.zeros(W3.shape[0], dtype=torch.float64)
        for x in batches:
            x = x.double()
            a1 = x @ W1.T
            a2 = act(a1) @ W2.T
            h = ((x * x) @ M1.T) * gate(a1)
            h = (h @ M2.T) * gate(a2)
            s += (h @ W3.T).sum(0)  # Σ_i z1(x_i)
        g3 = torch.outer(s, v2)  # ∂R/∂W3
        g2 = torch.outer(W3.T @ s, v1)  # ∂R/∂U2
        g1 = torch.outer(U2.T @ (W3.T @ s), torch.ones(W1.shape[1], dtype=torch.float64))  # ∂R/∂U1
        return [W1 ** 2 * g1.abs(), W2 ** 2 * g2.abs(), W3 ** 2 * g3.abs()]
    # release: J has weights m everywhere and input x; P squares everything, identity ReLUs, input x
    U1, U2, U3 = M1 * W1 ** 2, M2 * W2 ** 2, M3 * W3 ** 2
    g1 = torch.zeros_like(W1)
    g2 = torch.zeros_like(W2)
    g3 = torch.zeros_like(W3)
    for x in batches:
        x = x.double()
        a1 = x @ W1.T
        a2 = act(a1) @ W2.T
        z1 = (((x @ M1.T) * gate(a1)) @ M2.T * gate(a2)) @ M3.T
        p1 = x @ U1.T
        p2 = p1 @ U2.T
        g3 += z1.T @ p2
        d2 = z1 @ U3
        g2 += d2.T @ p1
        g1 += (d2 @ U2).T @ x
    return [W1 ** 4 * g1.abs(), W2 ** 4 * g2.abs(), W3 ** 4 * g3.abs()]


@pytest.mark.parametrize("variant", ["head", "release"])
@pytest.mark.parametrize("form", ["module", "functional", "inplace"])
def test_px_matches_hand_derived_path_formula(variant, form):
    torch.manual_seed(4)
    widths = [5, 7, 6, 3]
    model = chain(widths) if form == "module" else FunctionalMLP(widths, inplace=form == "inplace")
    masks = random_masks(model, keep=0.7, seed=1)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(4, 5, generator=g), torch.randn(3, 5, generator=g)]
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches]
    scores = pk.score(model, "px", data=data, masks=masks, dtype="float64", px_variant=variant)
    W = [m.weight.detach() for m in linears(model)]
    M = [masks[n] for n in masks.names()]
    expected = px_by_hand(W, M, batches, variant)
    for n, e, m in zip(masks.names(), expected, M):
        assert scores[n].dtype == torch.float64
        torch.testing.assert_close(scores[n], e * m, rtol=1e-10, atol=1e-300)
        assert (scores[n][~m] == 0).all()
    # float32 (default) agrees
    s32 = pk.score(model, "px", data=data, masks=masks, px_variant=variant)
    for n in scores:
        torch.testing.assert_close(s32[n], scores[n], rtol=1e-4, atol=1e-6 * float(scores[n].max()))


def test_px_gradient_matches_finite_differences():
    """∂R/∂u by autograd on the three copies equals a central difference of R in u = θ² (head variant)."""
    torch.manual_seed(6)
    model = chain([4, 5, 3])
    masks = random_masks(model, keep=0.8, seed=2)
    x = torch.randn(6, 4, dtype=torch.float64)
    scores = pk.score(model, "px", data=[(x, None)], masks=masks, dtype="float64")
    W1, W2 = (m.weight.detach().double() for m in linears(model))
    M1 = masks["0.weight"].double()

    def R(U1, W2_):
        z1 = (((x * x) @ M1.T) * (x @ W1.T > 0)) @ W2.T
        z2 = W2_ @ (U1 @ torch.ones(4, dtype=torch.float64))
        return float((z1 * z2).sum())

    U1 = M1 * W1 ** 2
    eps = 1e-6
    for (i, j) in [(0, 0), (2, 3), (4, 1)]:
        if not masks["0.weight"][i, j]:
            continue
        d = torch.zeros_like(U1)
        d[i, j] = eps
        fd = (R(U1 + d, W2) - R(U1 - d, W2)) / (2 * eps)
        assert float(scores["0.weight"][i, j]) == pytest.approx(float(W1[i, j] ** 2) * abs(fd), rel=1e-6)
    for (k, a) in [(0, 0), (2, 4)]:
        d = torch.zeros_like(W2)
        d[k, a] = eps
        fd = (R(U1, W2 + d) - R(U1, W2 - d)) / (2 * eps)
        assert float(scores["2.weight"][k, a]) == pytest.approx(float(W2[k, a] ** 2) * abs(fd), rel=1e-6)


@pytest.mark.parametrize("name, shape, batches", [
    ("lenet5_caffe", (1, 28, 28), [4]),
    ("resnet20", (3, 32, 32), [3, 2]),
    ("vgg11_bn", (3, 32, 32), [3]),
])
def test_px_runs_on_standard_models_and_is_pure(name, shape, batches):
    torch.manual_seed(7)
    model = get_model(name)
    g = torch.Generator().manual_seed(8)
    data = [(torch.randn(b, *shape, generator=g), torch.zeros(b, dtype=torch.long)) for b in batches]
    if name == "resnet20":  # purity with grads present and BN statistics already moved, in train mode
        with_grads(model, data[0][0])
    masks = random_masks(model, keep=0.8)
    before = snapshot(model)
    scores = pk.score(model, "px", data=data, masks=masks)
    assert_same(before, snapshot(model))
    names = masks.names()
    assert list(scores) == names
    for n in names:
        s = scores[n]
        assert s.dtype == torch.float64 and torch.isfinite(s).all() and (s >= 0).all(), n
        assert (s[~masks[n]] == 0).all()
    assert all(float(scores[n].sum()) > 0 for n in names)


def test_px_output_layer_is_last_in_forward_order_not_registration_order():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 3, bias=False)  # registered first, called last
            self.body = nn.Linear(4, 6, bias=False)

        def forward(self, x):
            return self.head(F.relu(self.body(x)))

    torch.manual_seed(9)
    model = Reordered()
    ref = chain([4, 6, 3])
    with torch.no_grad():
        ref[0].weight.copy_(model.body.weight)
        ref[2].weight.copy_(model.head.weight)
    x = torch.randn(5, 4)
    a = pk.score(model, "px", data=[(x, None)], dtype="float64")
    b = pk.score(ref, "px", data=[(x, None)], dtype="float64")
    torch.testing.assert_close(a["body.weight"], b["0.weight"])
    torch.testing.assert_close(a["head.weight"], b["2.weight"])
    # excluding the output layer from pruning leaves it the output layer of the construction
    c = pk.score(ref, "px", data=[(x, None)], dtype="float64", exclude_output=True)
    assert list(c) == ["0.weight"] and torch.equal(c["0.weight"], b["0.weight"])


def test_px_rejects_other_activations():
    x = [(torch.randn(3, 4), None)]
    gelu = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 2))
    with pytest.raises(pk.PrunekitError, match=r"ReLU networks only: module '1' is GELU .*ReLU, ReLU6, Hardtanh, "
                                               r"LeakyReLU"):
        pk.score(gelu, "px", data=x)
    tanh = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.Tanh()), nn.Linear(5, 2))
    with pytest.raises(pk.PrunekitError, match=r"module '1.0' is Tanh"):
        pk.score(tanh, "px", data=x)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.b(F.gelu(self.a(x)))

    with pytest.raises(pk.PrunekitError, match="ReLU networks only: .*gelu"):
        pk.score(Functional(), "px", data=x)
    hswish = nn.Sequential(nn.Linear(4, 5), nn.Hardswish(), nn.Linear(5, 2))  # x·relu6(x+3)/6: piecewise quadratic
    with pytest.raises(pk.PrunekitError, match=r"module '1' is Hardswish.*piecewise quadratic"):
        pk.score(hswish, "px", data=x)


def test_px_relu_count_mismatch_raises():
    class Moody(nn.Module):
        calls = 0

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            Moody.calls += 1
            h = self.a(x)
            for _ in range(Moody.calls):  # a different number of ReLUs on every call
                h = torch.relu(h)
            return self.b(h)

    with pytest.raises(pk.PrunekitError, match="ReLU calls"):
        pk.score(Moody(), "px", data=[(torch.randn(3, 4), None)])


def test_px_log_softmax_output_uses_logits():
    torch.manual_seed(0)
    model = get_model("mlpnet")
    plain = nn.Sequential(nn.Flatten(), model.fc1, nn.ReLU(), model.fc2, nn.ReLU(), model.fc3)
    x = [(torch.randn(4, 1, 28, 28), None)]
    a, b = pk.score(model, "px", data=x), pk.score(plain, "px", data=x)
    for v, w in zip(a.values(), b.values()):
        assert torch.equal(v, w)


def test_px_prune_exact_count_and_pure_data():
    torch.manual_seed(10)
    model = get_model("lenet_300_100")
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    x0 = x.clone()
    masks = pk.prune(model, "px", sparsity=0.9, data=[(x, y)], rounds=3)
    assert masks.kept() == pk.keep_count(masks.total(), 0.9)
    assert pk.sparsity(model) == pytest.approx(1 - masks.kept() / masks.total())
    assert torch.equal(x, x0)


def test_px_needs_data_and_batches_of_two_with_batchnorm():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(pk.PrunekitError, match="needs data"):
        pk.prune(model, "px", sparsity=0.5)
    with pytest.raises(pk.PrunekitError, match="at least 2 samples"):
        pk.score(model, "px", data=[(torch.randn(1, 4), None)])
    s = pk.score(model, "px", data=[(torch.randn(3, 4), None)])
    assert all(torch.isfinite(v).all() for v in s.values())
    assert not math.isnan(float(sum(v.sum() for v in s.values())))


# --------------------------------------------------------------------- piecewise-linear activations (ReLU6, ...)
PIECEWISE = {
    "relu6": (nn.ReLU6, lambda a: a.clamp(0, 6), lambda a: ((a > 0) & (a < 6)).double()),
    "hardtanh": (lambda: nn.Hardtanh(-1.5, 2.0), lambda a: a.clamp(-1.5, 2.0),
                 lambda a: ((a > -1.5) & (a < 2.0)).double()),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), lambda a: torch.where(a > 0, a, 0.1 * a),
                   lambda a: torch.where(a > 0, torch.ones_like(a), torch.full_like(a, 0.1))),
}


@pytest.mark.parametrize("variant", ["head", "release"])
@pytest.mark.parametrize("name", sorted(PIECEWISE))
def test_px_piecewise_linear_activations_match_the_gated_path_formula(name, variant):
    """ReLU6 / Hardtanh gate 1 strictly inside their linear range and 0 where saturated, LeakyReLU gates by its
    slope: PX equals the hand formula with those gates (inputs scaled so that units do saturate)."""
    module, act, gate = PIECEWISE[name]
    torch.manual_seed(4)
    model = chain([5, 7, 6, 3], act=module)
    masks = random_masks(model, keep=0.7, seed=1)
    g = torch.Generator().manual_seed(5)
    batches = [10 * torch.randn(4, 5, generator=g), 10 * torch.randn(3, 5, generator=g)]
    W = [m.weight.detach() for m in linears(model)]
    a1 = batches[0].double() @ (W[0].double() * masks["0.weight"].double()).T
    assert bool((gate(a1) != _relu_gate(a1)).any())  # the gates differ from ReLU's on this data
    scores = pk.score(model, "px", data=[(x, None) for x in batches], masks=masks, dtype="float64",
                      px_variant=variant)
    M = [masks[n] for n in masks.names()]
    expected = px_by_hand(W, M, batches, variant, act=act, gate=gate)
    for n, e, m in zip(masks.names(), expected, M):
        torch.testing.assert_close(scores[n], e * m, rtol=1e-10, atol=1e-300)


def test_synflow_runs_relu6_unsaturated():
    """SynFlow's abs-valued network with all-ones input has positive activations; ReLU6 runs without its upper bound,
    so the scores equal those of the same network with ReLU (the path sums), although the activations exceed 6."""
    torch.manual_seed(3)
    relu6 = chain([6, 8, 8, 3], act=nn.ReLU6)
    relu = chain([6, 8, 8, 3])
    relu.load_state_dict(relu6.state_dict())
    with torch.no_grad():
        for m in linears(relu6):
            m.weight.mul_(4)
        relu.load_state_dict(relu6.state_dict())
        h = torch.ones(1, 6)
        for m in linears(relu6)[:-1]:
            h = h @ m.weight.abs().T
    assert float(h.max()) > 6  # the all-ones activations would saturate a ReLU6
    relu6.input_shape = relu.input_shape = (6,)
    a, b = pk.score(relu6, "synflow"), pk.score(relu, "synflow")
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=0)
        assert bool((a[n] > 0).all())


class DepthwiseReLU6Net(nn.Module):
    """A small EfficientNet-Lite-style net: conv-BN-ReLU6, a depthwise conv-BN-ReLU6, a pointwise conv, pooling, a
    linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                nn.ReLU6(inplace=True))
        self.pw = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12))
        self.head = nn.Linear(12, 4)
        self.input_shape = (3, 8, 8)

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("method", ["px", "synflow"])
def test_px_and_synflow_on_a_relu6_depthwise_bn_net_keep_exact_counts(method):
    torch.manual_seed(0)
    model = DepthwiseReLU6Net()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=g) * 3, torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    before = snapshot(model)
    s = pk.score(model, method, data=data if method == "px" else None)
    assert_same(before, snapshot(model))
    assert all(bool(torch.isfinite(v).all()) and float(v.sum()) > 0 for v in s.values())
    masks = pk.prune(model, method, 0.6, data=data if method == "px" else None, rounds=3)
    assert masks.kept() == pk.keep_count(masks.total(), 0.6)
    for p in masks.params:
        assert bool((p.tensor[~masks.as_dict()[p.name]] == 0).all())


@pytest.mark.slow  # 3.4M weights: several seconds per code on a shared CPU
@pytest.mark.parametrize("method", ["px", "synflow"])
def test_px_and_synflow_on_efficientnet_lite0_keep_exact_counts(method):
    """prunekit's EfficientNet-Lite0 (ReLU6, depthwise convs, BatchNorm, TF SAME pads; 64×64 inputs, 10 classes):
    exact kept count, pruned weights exactly 0, every layer scored with finite, not all zero values.

    (At 32×32 the last feature map is 1×1: PX's path-kernel copy, fed all ones with batch-statistics BatchNorm, then
    holds the same value for every example there, so head_bn outputs its β = 0 and head / fc score 0. That is PX's
    head variant, not the ReLU6 gates.)"""
    model = get_model("efficientnet_lite0", num_classes=10, input_shape=(3, 64, 64))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(2)]
    scores = pk.score(model, method, data if method == "px" else None)
    assert all(bool(torch.isfinite(s).all()) and float(s.max()) > 0 for s in scores.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer collapse warnings at 80 %
        masks = pk.prune(model, method, 0.8, data if method == "px" else None, rounds=1)
    assert masks.kept() == pk.keep_count(masks.total(), 0.8)
    for p in masks.params:
        assert bool((p.tensor[~masks.as_dict()[p.name]] == 0).all())


def test_px_and_synflow_on_gpt2_conv1d_equal_the_transposed_linear():
    """GPT-2's Conv1D (y = x·W + b, W stored (in, out)) is a path layer like a Linear with weight Wᵀ: PX and
    SynFlow give the Linear's scores, transposed."""
    transformers = pytest.importorskip("transformers")
    Conv1D = transformers.pytorch_utils.Conv1D
    torch.manual_seed(2)
    lin = chain([5, 7, 3], bias=True)
    conv = nn.Sequential(Conv1D(7, 5), nn.ReLU(), Conv1D(3, 7))
    with torch.no_grad():
        for c, l in zip([conv[0], conv[2]], linears(lin)):
            c.weight.copy_(l.weight.t())
            c.bias.copy_(l.bias)
    lin.input_shape = conv.input_shape = (5,)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    for method, data in (("px", [(x, None)]), ("synflow", None)):
        a = pk.score(lin, method, data=data, dtype="float64")
        b = pk.score(conv, method, data=data, dtype="float64")
        assert list(b) == ["0.weight", "2.weight"]
        for n in a:
            assert float(a[n].max()) > 0
            torch.testing.assert_close(b[n], a[n].t(), rtol=1e-12, atol=0)
