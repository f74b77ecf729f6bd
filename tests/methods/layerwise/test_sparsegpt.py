"""``sparsegpt`` (issue 17 §1): the fast algorithm (Cholesky factor of H⁻¹, adaptive block masks, lazy batched
updates) against a plain reference written here (the inverse Hessian of the remaining columns recomputed with
torch.linalg.inv after every column, no batching), the least-squares optimum of its own mask as a lower bound, the
comparison with wanda and magnitude on a trained layer, the sequential pass, exact counts, N:M and refusals."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.families.layerwise.sparsegpt import inverse_factor, sparsegpt_matrix

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def reference(W, H, sparsity, block, damp=0.01, nm=None):
    """SparseGPT written plainly: columns left to right; at each block start, the block keeps the entries of
    largest w_c² / [(H_{c:,c:})⁻¹]_00 (the OBS error with the inverse Hessian of the columns not yet processed);
    each pruned weight of column j moves the rest of its row by the OBS update with inv(H[j:, j:]). ``nm=(N, M)``:
    at every M-th column, each row keeps the N of the next M columns of largest error instead."""
    H = H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    W = W.clone()
    r, d = W.shape
    keep = torch.zeros(r, d, dtype=torch.bool)
    for j in range(d):
        if nm is not None and j % nm[1] == 0:
            cols = list(range(j, j + nm[1]))
            err = torch.stack([W[:, c] ** 2 / torch.linalg.inv(H[c:, c:])[0, 0] for c in cols], 1)
            for i in range(r):
                keep[i, [cols[t] for t in torch.argsort(err[i], descending=True)[:nm[0]].tolist()]] = True
        if nm is None and j % block == 0:
            cols = list(range(j, min(j + block, d)))
            err = torch.stack([W[:, c] ** 2 / torch.linalg.inv(H[c:, c:])[0, 0] for c in cols], 1)
            k = round((1 - sparsity) * err.numel())
            flat = torch.zeros(err.numel(), dtype=torch.bool)
            flat[torch.argsort(err.reshape(-1), descending=True)[:k]] = True
            keep[:, cols] = flat.reshape(r, len(cols))
        Hinv = torch.linalg.inv(H[j:, j:])
        for i in range(r):
            if not keep[i, j]:
                W[i, j:] = W[i, j:] - W[i, j] / Hinv[0, 0] * Hinv[0, :]
    W[~keep] = 0
    return W, keep


def correlated_inputs(n, d, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=dtype) / d ** 0.5 + torch.eye(d, dtype=dtype)
    scale = torch.linspace(0.2, 3.0, d, dtype=dtype)
    return (torch.randn(n, d, generator=g, dtype=dtype) @ A) * scale


def test_the_fast_algorithm_matches_the_plain_reference_in_float64():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 40, generator=g, dtype=F64)
    X = correlated_inputs(300, 40)
    H = 2 * X.T @ X / X.shape[0]
    for block in (8, 40, 64):
        for s in (0.5, 0.75):
            Wr, kr = reference(W, H, s, block)
            nb = len(range(0, 40, block))
            quotas = [round((1 - s) * 6 * min(block, 40 - b * block)) for b in range(nb)]
            Wf, kf = sparsegpt_matrix(W, inverse_factor(H, 0.01), torch.ones_like(kr), quotas, block)
            assert torch.equal(kf, kr), (block, s)
            assert torch.allclose(Wf, Wr, atol=1e-8, rtol=0), (block, s, float((Wf - Wr).abs().max()))
            assert bool((Wf[~kf] == 0).all())


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_the_n_m_variant_matches_the_plain_reference_in_float64(nm):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(5, 32, generator=g, dtype=F64)
    X = correlated_inputs(200, 32, seed=7)
    H = 2 * X.T @ X / X.shape[0]
    Wr, kr = reference(W, H, 1 - nm[0] / nm[1], 16, nm=nm)
    Wf, kf = sparsegpt_matrix(W, inverse_factor(H, 0.01), torch.ones_like(kr), None, 16, pattern=nm)
    assert torch.equal(kf, kr)
    assert torch.allclose(Wf, Wr, atol=1e-8, rtol=0), float((Wf - Wr).abs().max())
    assert bool((kf.reshape(5, -1, nm[1]).sum(2) == nm[0]).all())


def linear_model(d_in=32, d_out=8, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).double()


def test_prune_writes_the_reference_solution_through_the_registry():
    """pk.prune(…, "sparsegpt") on one Linear layer: the same weights as the reference on H = 2XᵀX/N of the
    calibration batches, exact zeros, exactly round((1 − s)·n) kept."""
    X = correlated_inputs(96, 32, seed=3)
    data = [(X[i:i + 32], torch.zeros(32, dtype=torch.long)) for i in range(0, 96, 32)]
    m = linear_model()
    W0 = m.weight.detach().clone()
    masks = pk.prune(m, "sparsegpt", sparsity=0.5, data=data, block_size=16)
    Wr, kr = reference(W0, 2 * X.T @ X / 96, 0.5, 16)
    assert torch.equal(masks["weight"], kr)
    assert torch.allclose(m.weight.detach(), Wr, atol=1e-8, rtol=0)
    assert int(masks["weight"].sum()) == pk.keep_count(W0.numel(), 0.5)


def recon_error(W, What, X):
    return float(((W - What) @ X.T).square().sum())


def ls_optimum(W, keep, X):
    """The exact least-squares weights for a fixed mask: each row solves min ‖w X − ŵ_M X_M‖² on its kept
    columns (Eq. (2) of the paper), by lstsq."""
    out = torch.zeros_like(W)
    for i in range(W.shape[0]):
        idx = torch.nonzero(keep[i]).flatten()
        if idx.numel():
            sol = torch.linalg.lstsq(X[:, idx], (X @ W[i])[:, None]).solution[:, 0]
            out[i, idx] = sol
    return out


def train_tiny_mlp(seed=0):
    """A 24 → 32 → 4 ReLU MLP trained briefly on a synthetic task with correlated, unevenly scaled inputs."""
    torch.manual_seed(seed)
    X = correlated_inputs(512, 24, seed=seed, dtype=torch.float32)
    teacher = torch.randn(24, 4)
    y = (X @ teacher).argmax(1)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.double(), X.double(), y


@pytest.mark.parametrize("s", [0.5, 0.7])
def test_the_error_is_above_the_lstsq_optimum_of_its_mask_and_below_wanda_and_magnitude_on_a_trained_layer(s):
    model, X, y = train_tiny_mlp()
    data = [(X[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]
    W = model[0].weight.detach().clone()
    Xa = X  # the first layer's inputs
    errs = {}
    for code in ("sparsegpt", "wanda", "magnitude"):
        m = copy.deepcopy(model)
        kw = {"data": data} if code != "magnitude" else {"scope": "layer"}
        masks = pk.prune(m, code, sparsity=s, **kw)
        errs[code] = recon_error(W, m[0].weight.detach(), Xa)
        if code == "sparsegpt":
            keep = masks["0.weight"]
            best = recon_error(W, ls_optimum(W, keep, Xa), Xa)
            assert errs[code] >= best * (1 - 1e-9), (errs[code], best)
    assert errs["sparsegpt"] < errs["wanda"] and errs["sparsegpt"] < errs["magnitude"], errs


def test_sequential_feeds_each_layer_the_outputs_of_the_pruned_layers_before_it():
    model, X, y = train_tiny_mlp(seed=1)
    data = [(X[:256], y[:256])]
    X1 = X[:256]
    runs = {}
    for seq in (True, False):
        m = copy.deepcopy(model)
        masks = pk.prune(m, "sparsegpt", sparsity=0.5, data=data, sequential=seq)
        runs[seq] = (m, masks)
    # the first layer sees the data either way
    assert torch.equal(runs[True][0][0].weight, runs[False][0][0].weight)
    for seq, (m, masks) in runs.items():
        src = m if seq else model  # sequential: the pruned first layer's outputs; else the dense ones
        with torch.no_grad():
            H2 = src[1](src[0](X1))  # ReLU(first layer)
        H = 2 * H2.T @ H2 / H2.shape[0]
        W2 = model[2].weight.detach()
        quotas = [pk.keep_count(W2.numel(), 0.5)]
        Wq, kq = sparsegpt_matrix(W2, inverse_factor(H, 0.01), torch.ones_like(W2, dtype=torch.bool), quotas, 128)
        assert torch.equal(masks["2.weight"], kq), seq
        assert torch.allclose(m[2].weight.detach(), Wq, atol=1e-8, rtol=0), seq
    assert not torch.allclose(runs[True][0][2].weight, runs[False][0][2].weight)


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


def conv_data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]


def test_nested_rounds_keep_exact_counts_per_layer_and_pruned_weights_stay_zero():
    m = conv_net()
    data = conv_data()
    m1 = pk.prune(m, "sparsegpt", sparsity=0.5, data=data, block_size=16)
    first = {n: t.clone() for n, t in m1.items()}
    m2 = pk.prune(m, "sparsegpt", sparsity=0.8, data=data, masks=m1, block_size=16)
    for p in m2.params:
        n = p.tensor.numel()
        assert int(first[p.name].sum()) == pk.keep_count(n, 0.5)
        assert int(m2[p.name].sum()) == pk.keep_count(n, 0.8), p.name
        assert not bool((m2[p.name] & ~first[p.name]).any()), p.name  # nested
        assert bool((p.tensor.detach()[~m2[p.name]] == 0).all()), p.name
        assert bool(torch.isfinite(p.tensor).all())


def test_two_four_keeps_two_of_every_four_input_channels_at_every_kernel_position():
    m = conv_net()
    masks = pk.prune(m, "sparsegpt", sparsity=0.5, data=conv_data(), pattern="2:4", block_size=16,
                     ignore=["0"])  # the stem has 3 input channels, not a multiple of 4
    for p in masks.params:
        k = masks[p.name]
        if k.dim() == 4:  # conv: groups of 4 input channels at each (output channel, kernel position)
            for o in range(k.shape[0]):
                for c0 in range(0, k.shape[1], 4):
                    for i in range(k.shape[2]):
                        for j in range(k.shape[3]):
                            assert int(k[o, c0:c0 + 4, i, j].sum()) == 2, (p.name, o, c0, i, j)
        else:
            assert bool((k.reshape(k.shape[0], -1, 4).sum(2) == 2).all()), p.name
        assert bool((p.tensor.detach()[~k] == 0).all()), p.name


def test_two_four_on_a_conv_is_the_plain_reference_on_channel_fastest_columns():
    """One conv layer (8 input channels, 2×2 kernel): pk.prune with pattern 2:4 equals the plain reference run on
    the im2col matrix with its columns in (kernel position, channel) order, mapped back to the weight."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(8, 3, 2)).double()
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(6, 8, 5, 5, generator=g, dtype=F64) for _ in range(2)]
    data = [(x, torch.zeros(6, dtype=torch.long)) for x in xs]
    W0 = m[0].weight.detach().clone()  # (3, 8, 2, 2)
    # im2col by hand: column (t, c) = x[n, c, i + di, j + dj] with t = 2·di + dj
    cols = [torch.stack([x[:, c, di:di + 4, dj:dj + 4].reshape(-1) for di in range(2) for dj in range(2)
                         for c in range(8)], 1) for x in xs]
    X = torch.cat(cols)  # [tokens, 32], order (t, c)
    Wp = W0.permute(0, 2, 3, 1).reshape(3, 32)  # the same (t, c) order
    Wr, kr = reference(Wp, 2 * X.T @ X / X.shape[0], 0.5, 16, nm=(2, 4))
    masks = pk.prune(m, "sparsegpt", sparsity=0.5, data=data, pattern="2:4", block_size=16)
    back = lambda t: t.reshape(3, 2, 2, 8).permute(0, 3, 1, 2)  # noqa: E731
    assert torch.equal(masks["0.weight"], back(kr))
    assert torch.allclose(m[0].weight.detach(), back(Wr), atol=1e-8, rtol=0)


def test_refusals_are_clear():
    m = conv_net()
    with pytest.raises(pk.PrunekitError, match=r"pattern 2:4 prunes 0.5 of the weights: ask for sparsity=0.5"):
        pk.prune(m, "sparsegpt", sparsity=0.6, data=conv_data(), pattern="2:4", block_size=16, ignore=["0"])
    with pytest.raises(pk.PrunekitError, match=r"'0.weight' has 3 input channels, not a multiple of 4.*ignore="):
        pk.prune(m, "sparsegpt", sparsity=0.5, data=conv_data(), pattern="2:4", block_size=16)
    with pytest.raises(pk.PrunekitError, match=r"block_size 10 must be a multiple of M=4"):
        pk.prune(m, "sparsegpt", data=conv_data(), pattern="2:4", block_size=10, ignore=["0"])
    t = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 10 * 10, 2))
    with pytest.raises(pk.PrunekitError, match=r"transposed convolution .*ignore="):
        pk.prune(t, "sparsegpt", sparsity=0.5, data=conv_data(), targets=["0", "2"])


def test_the_memory_plan_refuses_before_reading_any_data():
    reads = []

    class Data:
        def __iter__(self):
            reads.append(1)
            return iter(conv_data())

    m = conv_net()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    with pytest.raises(pk.PrunekitError, match=r"needs .* MiB but 0\.0 MiB are allowed.*statistics .*'5.weight'.*72 "
                                               r"input columns.*memory_limit"):
        pk.prune(m, "sparsegpt", sparsity=0.5, data=Data(), memory_limit=1000)
    assert not reads
    assert all(torch.equal(before[n], t) for n, t in m.state_dict().items())


class SharedInput(nn.Module):
    """Three Linear layers read the same tensor (as q, k, v do). Every batch's tensor is a new tensor object over
    the same memory (as a caching allocator may hand out), with a fresh version counter."""

    def __init__(self, cols: int):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(cols, 6), nn.Linear(cols, 6), nn.Linear(cols, 6)
        self.bufs: dict = {}  # one array per batch shape

    def forward(self, x):
        buf = self.bufs.setdefault(tuple(x.shape), np.zeros(tuple(x.shape)))
        buf[:] = np.tanh(x.detach().numpy())
        h = torch.from_numpy(buf)  # same address every batch, version 0
        return self.q(h) + self.k(h) * self.v(h)


def test_layers_sharing_an_input_get_the_hessian_of_every_batch():
    """The XᵀX shared by q, k, v is reused only for the same tensor object: a new input at a reused address
    still counts (each batch exactly once)."""
    X = correlated_inputs(120, 12, seed=5)
    data = [(X[i:i + 20].clone(), torch.zeros(20, dtype=torch.long)) for i in range(0, 120, 20)]
    m = SharedInput(12).double()
    W0 = {n: getattr(m, n).weight.detach().clone() for n in "qkv"}
    pk.prune(m, "sparsegpt", sparsity=0.5, data=data, sequential=False)
    h = torch.tanh(X)
    U = inverse_factor(2 * h.T @ h / len(h), 0.01)
    for n in "qkv":
        want, _ = sparsegpt_matrix(W0[n], U, torch.ones(6, 12, dtype=torch.bool), [36], 128)
        assert torch.allclose(getattr(m, n).weight.detach(), want, atol=1e-10), n


def test_the_memory_plan_counts_one_layers_hessian_at_a_time_when_sequential():
    from prunekit.families.layerwise.base import memory_plan

    m = conv_net()  # Hessians: 27² (stem), 2 groups × 36² (grouped conv), 72² (Linear), float32
    work = 3 * 72 * 72 * 4  # SparseGPT's three d×d working matrices of the widest layer
    seq = memory_plan(m, "sparsegpt")
    assert [c for _, c, _ in seq.layers] == [27, 36, 72]
    assert seq.statistics == 72 * 72 * 4 + work and seq.fits
    assert memory_plan(m, "sparsegpt", sequential=False).statistics == (27 ** 2 + 2 * 36 ** 2 + 72 ** 2) * 4 + work
    assert memory_plan(m, "sparsegpt", float64=True).statistics == 2 * seq.statistics
    assert memory_plan(m, "sparsegpt", ignore=["5"]).statistics == 2 * 36 ** 2 * 4 + 3 * 36 * 36 * 4
    wanda = memory_plan(m, "wanda")
    assert wanda.statistics == (27 + 2 * 36 + 72) * 8  # ‖X_j‖² per column, float64, every layer
    # besides: per weight a float64 score, a backup (and for sparsegpt the solved copy) and two masks; plus the
    # largest layer's selection temporaries
    sizes = [p.numel() for n, p in m.named_parameters() if n.endswith("weight") and p.dim() > 1]
    assert seq.working == sum(sizes) * (8 + 4 + 2 + 4) + max(sizes) * 24
    assert wanda.working == sum(sizes) * (8 + 4 + 2) + max(sizes) * 40
    assert seq.peak == seq.statistics + seq.working


def test_fewer_calibration_rows_than_input_columns_warn():
    from prunekit.families.layerwise.sparsegpt import CalibrationWarning

    X = correlated_inputs(20, 32)
    with pytest.warns(CalibrationWarning, match=r"'weight' saw 20 calibration rows .* for 32 input columns.*at "
                                                r"least as many calibration samples as input columns"):
        pk.prune(linear_model(), "sparsegpt", sparsity=0.5, data=[(X, torch.zeros(20, dtype=torch.long))])


@pytest.mark.parametrize("d", [40, 513, 1030])
def test_gram_is_xtx_for_narrow_wide_and_grouped_inputs(d):
    """The banded upper-triangle product equals XᵀX (float64, 1e-10), wide single groups and grouped inputs."""
    from prunekit.families.layerwise.sparsegpt import gram, symmetric

    g = torch.Generator().manual_seed(d)
    X = torch.randn(300, 1, d, generator=g, dtype=F64)
    want = X[:, 0].T @ X[:, 0]
    assert torch.allclose(gram(X)[0], want, rtol=1e-10, atol=1e-10)
    X2 = torch.randn(200, 1, d, generator=g, dtype=F64)  # summed unmirrored, mirrored once: the same
    summed = symmetric(gram(X, mirror=False) + gram(X2, mirror=False))[0]
    assert torch.allclose(summed, want + X2[:, 0].T @ X2[:, 0], rtol=1e-10, atol=1e-10)
    Xg = torch.randn(50, 3, 17, generator=g, dtype=F64)
    for j in range(3):
        assert torch.allclose(gram(Xg)[j], Xg[:, j].T @ Xg[:, j], rtol=1e-10, atol=1e-10)


def test_the_inverse_factor_is_the_upper_cholesky_factor_of_the_explicit_inverse():
    """U from one factorisation of the reversed H and a triangular inverse equals cholesky(inv(H + λI), upper)."""
    X = correlated_inputs(200, 60, seed=3)
    H = X.T @ X
    U = inverse_factor(H, 0.01)
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * float(H.diagonal().mean()))
    want = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert torch.allclose(U, want, rtol=1e-10, atol=1e-12) and bool((torch.tril(U, -1) == 0).all())
    with pytest.raises(pk.PrunekitError, match="not positive definite"):
        inverse_factor(-torch.eye(4, dtype=F64), 0.0)
