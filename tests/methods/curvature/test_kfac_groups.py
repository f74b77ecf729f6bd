"""kfac on grouped / depthwise Conv2d, Conv1d and Conv3d: per-group Kronecker factors checked against an explicit
reference (patches cut out by hand position by position, per-example gradients one example at a time, each group's
Fisher block Γ_g ⊗ A_g built with torch.kron and inverted with torch.linalg.inv)."""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import prunekit as pk
import prunekit.criteria.second_order_baselines as sob
from prunekit.params import prunable_params
from prunekit.prune import default_loss, split_options
from prunekit.registry import ScoreContext

pytestmark = pytest.mark.usefixtures("one_thread")


class OddConvs(nn.Module):
    """Conv2d (groups=1) → grouped Conv2d (2 groups) → depthwise Conv2d (stride 2, reflect padding) → grouped
    Conv1d (dilation 2) → Conv1d (groups=1, circular padding) → Linear; tanh in between; float64."""

    input_shape = (3, 5, 5)
    classes = 3

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.full = nn.Conv2d(3, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, padding_mode="reflect")
        self.c1g = nn.Conv1d(6, 4, 2, groups=2, dilation=2)
        self.c1 = nn.Conv1d(4, 3, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(21, 3)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.full(x))
        h = torch.tanh(self.grouped(h))
        h = torch.tanh(self.depthwise(h))  # [n, 6, 3, 3]
        h = torch.tanh(self.c1g(h.flatten(2)))  # [n, 4, 7]
        h = torch.tanh(self.c1(h))  # [n, 3, 7]
        return self.fc(h.flatten(1))


class Convs3d(nn.Module):
    """Conv3d (groups=1) → grouped Conv3d (2 groups, stride (1, 2, 2)) → Linear."""

    input_shape = (2, 3, 4, 4)
    classes = 3

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.full = nn.Conv3d(2, 4, (2, 3, 3), padding=(0, 1, 1))
        self.grouped = nn.Conv3d(4, 4, 2, stride=(1, 2, 2), groups=2)
        self.fc = nn.Linear(4 * 1 * 2 * 2, 3)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.full(x))
        return self.fc(torch.tanh(self.grouped(h)).flatten(1))


def batches(model, n, seed=1, size=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *model.input_shape, generator=g, dtype=torch.float64)
    Y = torch.randint(0, model.classes, (n,), generator=g)
    return [(X[a:a + size], Y[a:a + size]) for a in range(0, n, size)], X, Y


def make_ctx(model, data, include_bias=False, seed=0, **opts):
    _, mo = split_options(pk.get_method("kfac"), opts)
    masks = pk.Masks(model, params=prunable_params(model, include_bias=include_bias))
    return ScoreContext(model=model, params=masks.params, masks=masks.as_dict(), data=data, loss=default_loss,
                        options=mo, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ the reference


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}


def hand_patches(conv, x):
    """[P, in·∏k] for one example x [in, *S]: pad by conv.padding with its padding mode, then cut out each output
    position's window (stride, dilation) by slicing; rows in the weight's (channel, k1, k2, ...) order."""
    pads = [q for p in reversed(conv.padding) for q in (p, p)]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x[None], pads, mode=mode)[0] if any(pads) else x
    out = [(xp.shape[1 + i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
           for i in range(len(conv.kernel_size))]
    rows = []
    for pos in itertools.product(*map(range, out)):
        sl = tuple(slice(o * s, o * s + d * (k - 1) + 1, d)
                   for o, s, d, k in zip(pos, conv.stride, conv.dilation, conv.kernel_size))
        rows.append(xp[(slice(None), *sl)].reshape(-1))
    return torch.stack(rows)


def reference_factors(model, X, Y):
    """{module name: (A [g, din, din], Γ [g, dg, dg])} by explicit loops: A_g = (1/(N·P))·Σ_n Σ_p a_g a_gᵀ over the
    group's rows of each patch, Γ_g = (1/N)·Σ_n Σ_p δ_g δ_gᵀ over the group's output channels."""
    mods = layers(model)
    N = X.shape[0]
    acc = {}
    for n in range(N):
        ins, outs = {}, {}

        def keep(mod, a, o, k):
            ins[k], outs[k] = a[0][0], o

        hooks = [m.register_forward_hook(lambda mod, a, o, k=k: keep(mod, a, o, k)) for k, m in mods.items()]
        try:
            loss = F.cross_entropy(model(X[n:n + 1]), Y[n:n + 1])
        finally:
            for h in hooks:
                h.remove()
        grads = dict(zip(outs, torch.autograd.grad(loss, list(outs.values()))))
        for k, m in mods.items():
            x, d = ins[k].detach(), grads[k][0]
            if isinstance(m, nn.Linear):
                a_rows, d_rows, gr = x.reshape(1, -1), d.reshape(1, -1), 1
            else:
                a_rows, d_rows, gr = hand_patches(m, x), d.reshape(d.shape[0], -1).t(), m.groups
            P = a_rows.shape[0]
            din, dg = a_rows.shape[1] // gr, d_rows.shape[1] // gr
            A = torch.stack([sum(torch.outer(r[g * din:(g + 1) * din], r[g * din:(g + 1) * din]) for r in a_rows)
                             for g in range(gr)]) / (N * P)
            G = torch.stack([sum(torch.outer(r[g * dg:(g + 1) * dg], r[g * dg:(g + 1) * dg]) for r in d_rows)
                             for g in range(gr)]) / N
            A0, G0 = acc.get(k, (0, 0))
            acc[k] = (A0 + A, G0 + G)
    return acc


def reference_blocks(model, X, Y, lam, pi):
    """{param name: [(rows of the flattened tensor, F_g⁻¹)]}: each group's damped Kronecker block
    kron(Γ_g + √(λ/π_g)·I, A_g + √(λπ_g)·I) (bias: A_g = [[1]]), inverted with torch.linalg.inv."""
    out = {}
    for k, (A, G) in reference_factors(model, X, Y).items():
        m = layers(model)[k]
        gr, din, dg = A.shape[0], A.shape[1], G.shape[1]
        w_blocks, b_blocks = [], []
        for g in range(gr):
            p = 1.0
            if pi:
                p = float((torch.trace(A[g]) / din) / (torch.trace(G[g]) / dg))
            Gd = G[g] + math.sqrt(lam / p) * torch.eye(dg, dtype=torch.float64)
            Ad = A[g] + math.sqrt(lam * p) * torch.eye(din, dtype=torch.float64)
            rows = slice(g * dg, (g + 1) * dg)
            w_blocks.append((rows, torch.linalg.inv(torch.kron(Gd, Ad))))
            one = torch.full((1, 1), 1.0 + math.sqrt(lam * p), dtype=torch.float64)
            b_blocks.append((rows, torch.linalg.inv(torch.kron(Gd, one))))
        out[f"{k}.weight"] = w_blocks
        if m.bias is not None:
            out[f"{k}.bias"] = b_blocks
    return out


def reference_scores(tensors, blocks):
    """ρ = w²/(2·[F_g⁻¹]_qq) per group, w flattened row-major (out, in/g·∏k), group g = rows g·out/g .. ."""
    out = {}
    for name, t in tensors.items():
        W = t.detach().reshape(t.shape[0], -1)
        s = torch.empty_like(W)
        for rows, Finv in blocks[name]:
            s[rows] = (W[rows] ** 2).reshape(W[rows].shape) / (2 * torch.diagonal(Finv).reshape(W[rows].shape))
        out[name] = s.reshape(t.shape)
    return out


# ------------------------------------------------------------------------------------------------------ tests


MODELS = {"odd2d_1d": OddConvs, "conv3d": Convs3d}


@pytest.mark.parametrize("net", list(MODELS))
def test_factors_per_group_match_explicit_loops(net):
    m = MODELS[net]()
    data, X, Y = batches(m, 12)
    fac = sob.kfac_factors(make_ctx(m, data, kfac_samples=11, kfac_batch=4))
    want = reference_factors(m, X[:11], Y[:11])
    for k, (A, G) in want.items():
        f = fac[f"{k}.weight"]
        groups = A.shape[0]
        assert f.groups == groups
        if groups == 1:  # the groups=1 layout is unchanged: plain matrices
            assert f.A.dim() == 2 and f.G.dim() == 2 and isinstance(f.pi, float)
        torch.testing.assert_close(f.A.reshape(A.shape), A)
        torch.testing.assert_close(f.G.reshape(G.shape), G)
    assert {f.groups for f in fac.values()} >= {1, 2} | ({6} if net == "odd2d_1d" else set())


@pytest.mark.parametrize("net,pi", [("odd2d_1d", False), ("odd2d_1d", True), ("conv3d", True)])
def test_scores_match_explicit_per_group_kronecker_inverse(net, pi):
    m = MODELS[net]()
    data, X, Y = batches(m, 12)
    lam = 1e-2
    opts = dict(kfac_samples=12, kfac_batch=5, fisher_damp=lam, kfac_pi=pi)
    scores = pk.score(m, "kfac", data=data, include_bias=True, **opts)
    blocks = reference_blocks(m, X, Y, lam, pi)
    tensors = {n: p for n, p in m.named_parameters()}
    want = reference_scores(tensors, blocks)
    assert set(scores) == set(want)
    for name in want:
        torch.testing.assert_close(scores[name], want[name], rtol=1e-7, atol=1e-12)
    if pi:  # π_g differs between the groups of a layer: one shared π would not pass the check above
        fac = sob.kfac_factors(make_ctx(m, data, **opts))
        grouped = [f for f in fac.values() if f.groups > 1]
        assert any(float(f.pi.max() - f.pi.min()) > 1e-3 for f in grouped)


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_obs_update_is_the_per_group_explicit_inverse(sigma):
    m = OddConvs()
    data, X, Y = batches(m, 12)
    lam = 1e-3
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    blocks = reference_blocks(m, X, Y, lam, False)
    masks = pk.prune(m, "kfac", 0.6, data=data, include_bias=True, kfac_samples=12, fisher_damp=lam,
                     scale_prune_update=sigma)
    got = dict(m.named_parameters())
    for name, w in w0.items():
        keep = masks[name].reshape(w.shape[0], -1)
        W = w.reshape(w.shape[0], -1)
        want = W.clone()
        for rows, Finv in blocks[name]:
            wg, kg = W[rows].reshape(-1), keep[rows].reshape(-1)
            u = torch.where(~kg, wg / torch.diagonal(Finv), torch.zeros_like(wg))
            want[rows] = (wg - sigma * (Finv @ u)).reshape(W[rows].shape)
        g = got[name].detach().reshape(W.shape)
        assert bool((g[~keep] == 0).all())
        torch.testing.assert_close(g[keep], want[keep], rtol=1e-7, atol=1e-12)
        if name.endswith("weight"):  # the update moved survivors of every layer (a depthwise bias is its own group)
            assert not torch.equal(g[keep], W[keep])


class SplitGroups(nn.Module):
    """OddConvs's first two layers with the grouped conv written as 2 separate groups=1 convs on channel halves."""

    def __init__(self, odd: OddConvs):
        super().__init__()
        self.full = odd.full
        self.g0, self.g1 = nn.Conv2d(2, 3, 3, padding=1).double(), nn.Conv2d(2, 3, 3, padding=1).double()
        with torch.no_grad():
            for i, c in enumerate((self.g0, self.g1)):
                c.weight.copy_(odd.grouped.weight[3 * i:3 * i + 3])
                c.bias.copy_(odd.grouped.bias[3 * i:3 * i + 3])
        self.fc = nn.Linear(6 * 25, 3).double()

    def forward(self, x):
        h = torch.tanh(self.full(x))
        h = torch.cat([self.g0(h[:, :2]), self.g1(h[:, 2:])], 1)
        return self.fc(torch.tanh(h).flatten(1))


class Grouped(nn.Module):
    def __init__(self, split: SplitGroups, odd: OddConvs):
        super().__init__()
        self.full, self.grouped, self.fc = split.full, odd.grouped, split.fc

    def forward(self, x):
        return self.fc(torch.tanh(self.grouped(torch.tanh(self.full(x)))).flatten(1))


def test_grouped_conv_equals_its_groups_as_separate_groups1_convs():
    """A grouped conv's per-group factors, π, scores and OBS update are those of the groups=1 path applied to each
    group written as its own conv (the groups=1 code path is the independent side here)."""
    odd = OddConvs()
    split = SplitGroups(odd)
    grouped = Grouped(split, odd)
    data, X, Y = batches(odd, 10)
    opts = dict(kfac_samples=10, fisher_damp=1e-3, kfac_pi=True)
    fs = sob.kfac_factors(make_ctx(split, data, include_bias=True, **opts))
    fg = sob.kfac_factors(make_ctx(grouped, data, include_bias=True, **opts))
    f = fg["grouped.weight"]
    for g, part in enumerate(("g0", "g1")):
        for attr in ("A", "G", "A_inv", "G_inv"):
            torch.testing.assert_close(getattr(f, attr)[g], getattr(fs[f"{part}.weight"], attr))
        assert float(f.pi[g]) == pytest.approx(fs[f"{part}.weight"].pi)
        for t in ("weight", "bias"):
            torch.testing.assert_close(fg[f"grouped.{t}"].inv_diag[3 * g:3 * g + 3], fs[f"{part}.{t}"].inv_diag)
    ss = pk.score(split, "kfac", data=data, include_bias=True, **opts)
    sg = pk.score(grouped, "kfac", data=data, include_bias=True, **opts)
    torch.testing.assert_close(sg["grouped.weight"], torch.cat([ss["g0.weight"], ss["g1.weight"]]))
    torch.testing.assert_close(sg["fc.weight"], ss["fc.weight"])


class CustomForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_overridden_forward_is_still_refused_with_a_clear_error():
    m = nn.Sequential(CustomForward(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)).double()
    data = [(torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(pk.PrunekitError, match=r"'0.weight' belongs to CustomForward with an overridden forward.*"
                                               r"exclude=\['0'\]"):
        pk.score(m, "kfac", data=data, kfac_samples=4)
    s = pk.score(m, "kfac", data=data, kfac_samples=4, exclude=["0"])  # the advertised fix works
    assert set(s) == {"2.weight"}


# ------------------------------------------------------------------------------------------------------ DDP


def _ddp_worker(rank, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        m = OddConvs()
        data, _, _ = batches(m, 12, size=3)
        fac = sob.kfac_factors(make_ctx(m, data, include_bias=True, kfac_samples=12, kfac_pi=True))
        torch.save({k: (f.A, f.G, f.inv_diag) for k, f in fac.items()}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_one_process_group_factors(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    m = OddConvs()
    data, _, _ = batches(m, 12, size=3)
    want = sob.kfac_factors(make_ctx(m, data, include_bias=True, kfac_samples=12, kfac_pi=True))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for k, f in want.items():
            for a, b in zip(got[k], (f.A, f.G, f.inv_diag)):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
