"""Pruning-at-initialization criteria against independent references: explicit per-sample loops, hand formulas,
finite differences for GraSP's Hessian-gradient product."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.diagnostics import collapse_report

DATA_METHODS = ["grad_norm", "snip", "grasp", "fisher_diag", "fisher_pruner", "fts", "fbss"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(bn=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 3, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 6), nn.ReLU(), nn.Linear(6, 3)]
    net = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics, eval mode
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def make_data(n=10, chunk=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + chunk], y[i:i + chunk]) for i in range(0, n, chunk)], x, y


def loop_stats(net, x, y, B):
    """ḡ and F̂ by an explicit loop: one backward per mini-batch of B consecutive samples (mean loss)."""
    net = copy.deepcopy(net).eval()
    ws = [p for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]
    gs = []
    for i in range(0, len(y), B):
        net.zero_grad()
        F.cross_entropy(net(x[i:i + B]), y[i:i + B]).backward()
        gs.append([w.grad.clone() for w in ws])
    mean = [sum(g[j] for g in gs) / len(gs) for j in range(len(ws))]
    sq = [sum(g[j] ** 2 for g in gs) / len(gs) for j in range(len(ws))]
    return [w.detach() for w in ws], mean, sq


def by_order(scores):
    return list(scores.values())


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("bn", [False, True])
def test_first_and_fisher_scores_match_explicit_loop(B, bn):
    net = make_net(bn)
    batches, x, y = make_data()
    ws, mean, sq = loop_stats(net, x, y, B)
    expect = {
        "grad_norm": [m.abs() for m in mean],
        "snip": [(w * m).abs() for w, m in zip(ws, mean)],
        "fisher_diag": sq,
        "fisher_pruner": [0.5 * w**2 * s for w, s in zip(ws, sq)],
        "fts": [(w * m + 0.5 * w**2 * B * s).abs() for w, m, s in zip(ws, mean, sq)],
    }
    for method, ref in expect.items():
        got = by_order(pk.score(net, method, data=batches, batch_size=B))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-12, msg=method)


def test_fts_one_sample_formula():
    net = make_net()
    _, x, y = make_data(1, 1)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    scores = pk.score(net, "fts", data=[(x, y)])
    for (n, p) in [(n, p) for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]:
        th, g = p.detach(), p.grad
        torch.testing.assert_close(scores[n].double(), (th * g + 0.5 * th**2 * g**2).abs())


def test_fts_signed_and_batch_factor():
    net = make_net()
    batches, x, y = make_data()
    ws, mean, sq = loop_stats(net, x, y, 2)
    got = by_order(pk.score(net, "fts", data=batches, batch_size=2, fts_batch_factor=False, fts_signed=True))
    for a, w, m, s in zip(got, ws, mean, sq):
        torch.testing.assert_close(a.double(), -(w * m + 0.5 * w**2 * s))


def test_fbss_formula_relative_damping_and_dead_units():
    net = make_net()
    with torch.no_grad():  # hidden unit 0 of the first Linear is dead: its input weights and bias push it below 0
        net[3].weight[0].fill_(-1.0)
        net[3].bias[0] = -100.0
    batches, x, y = make_data()
    ws, mean, sq = loop_stats(net, x, y, 1)
    lam = 1e-5 * (sum(float(s.sum()) for s in sq) / sum(s.numel() for s in sq))
    got = pk.score(net, "fbss", data=batches)
    for a, w, m, s in zip(by_order(got), ws, mean, sq):
        h = s + lam
        torch.testing.assert_close(a.double(), 0.5 * h * (w - m / h) ** 2)
        assert torch.isfinite(a).all()
    # the dead unit's outgoing weights have F̂ = 0: their score is ½·λ·θ²
    dead = got["5.weight"][:, 0]
    torch.testing.assert_close(dead.double(), 0.5 * lam * net[5].weight[:, 0].detach() ** 2)
    assert float(sq[2][:, 0].abs().sum()) == 0.0
    absolute = pk.score(net, "fbss", data=batches, damp=0.5, damp_mode="absolute")
    torch.testing.assert_close(absolute["5.weight"][:, 0].double(), 0.25 * net[5].weight[:, 0].detach() ** 2)


def test_grasp_matches_finite_difference_hessian_vector_product():
    net = make_net()
    batches, x, y = make_data(8, 8)
    T = 200.0
    ws = [p for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]

    def grads(params_shift):
        m = copy.deepcopy(net).eval()
        mw = [p for n, p in m.named_parameters() if n.endswith("weight") and p.dim() > 1]
        with torch.no_grad():
            for w, d in zip(mw, params_shift):
                w.add_(d)
        return torch.autograd.grad(F.cross_entropy(m(x) / T, y), mw)

    v = grads([torch.zeros_like(w) for w in ws])
    eps = 1e-4
    plus = grads([eps * vi for vi in v])
    minus = grads([-eps * vi for vi in v])
    hv = [(a - b) / (2 * eps) for a, b in zip(plus, minus)]
    got = pk.score(net, "grasp", data=batches, batch_size=8)
    for a, w, h in zip(by_order(got), ws, hv):
        torch.testing.assert_close(a.double(), w.detach() * h, rtol=1e-4, atol=1e-12)
    # official GraSP removes the largest -θ·Hv: every weight it removes scores (by the reference) no higher than
    # every weight prunekit keeps, i.e. the kept sets agree up to ties
    masks = pk.prune(copy.deepcopy(net), "grasp", sparsity=0.5, data=batches, batch_size=8)
    ref = torch.cat([(w.detach() * h).reshape(-1) for w, h in zip(ws, hv)])
    kept = torch.cat([masks[n].reshape(-1) for n in masks.names()])
    assert int(kept.sum()) == pk.keep_count(ref.numel(), 0.5)
    assert float(ref[kept].min()) >= float(ref[~kept].max()) - 1e-9


@pytest.mark.parametrize("method", DATA_METHODS)
def test_scoring_is_pure(method):
    net = make_net(bn=True)
    net.train()
    net[0].weight.grad = torch.ones_like(net[0].weight)
    before = copy.deepcopy(net.state_dict())
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()}
    batches, _, _ = make_data()
    pk.score(net, method, data=batches)
    pk.score(net, method, data=batches, score_bn="train", batch_size=2)
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in net.named_parameters():
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n


@pytest.mark.parametrize("method", DATA_METHODS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_rounds_nested_exact(method, scope):
    net = make_net()
    batches, _, _ = make_data()
    one = pk.prune(copy.deepcopy(net), method, sparsity=0.5, data=batches, scope=scope)
    masks = pk.prune(net, method, sparsity=0.8, data=batches, scope=scope, rounds=3, masks=None)
    if scope == "global":
        assert masks.kept() == pk.keep_count(masks.total(), 0.8)
    else:
        for s in masks.layer_stats():
            assert s.kept == max(1, int(0.2 * s.total + 0.5))
    again = pk.prune(net, method, sparsity=0.9, data=batches, scope=scope, masks=masks)
    for n in masks.names():
        assert not bool((again[n] & ~masks[n]).any())
    assert one.kept() > 0


def test_data_method_without_data_is_clear():
    with pytest.raises(pk.PrunekitError, match="needs data"):
        pk.prune(make_net(), "snip", sparsity=0.5)


def test_collapse_report_on_a_case_built_to_collapse():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        net[3].weight.mul_(1e-4)  # global magnitude empties this layer first
    with pytest.warns(UserWarning, match="collapse"):
        masks = pk.prune(net, "magnitude", sparsity=0.7)
    rep = collapse_report(net, masks, input_shape=(1, 4, 4))
    assert rep.collapsed == ["3.weight"] and rep.connected is False
    healthy = pk.prune(copy.deepcopy(net), "magnitude", sparsity=0.7, scope="layer")
    rep = collapse_report(net, healthy, input_shape=(1, 4, 4))
    assert rep.collapsed == [] and rep.connected is True
